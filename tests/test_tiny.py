"""The offline Qwen2.5 tokenizer and the tiny random-weight checkpoints (finers_rt.export)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [export] extra")
transformers = pytest.importorskip("transformers", reason="needs the [export] extra")

from finers_rt.export import tiny, tokenizer  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

IM_END, IMAGE_PAD = 151645, 151655
CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
CHAT_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
)
ROUNDTRIP = [
    "Hello world",
    "请在图中找到那辆红色的小汽车。",  # Chinese
    "box [1932, 1080, 3840, 2160] 0.5",  # digits are single tokens
    '{"bbox": [12, 34, 56, 78], "points_1": [1, 2]}\n\n  indented\ttab\r\n',
    "Ünïcödé — ✓ 🚀 日本語 한국어",
]


def _sha256_tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def raw_tok(tiny_ckpt: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_ckpt / "gse" / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tok(tiny_ckpt: Path):
    return transformers.AutoTokenizer.from_pretrained(tiny_ckpt / "gse")


@pytest.fixture(scope="module")
def processor(tiny_ckpt: Path):
    return transformers.AutoProcessor.from_pretrained(tiny_ckpt / "gse")


def _check_ids(encode) -> None:
    """`encode(text) -> list[int]`, shared by the tokenizers and transformers checks."""
    assert encode("Hello world") == [9707, 1879]
    assert encode("<|im_end|>") == [IM_END]
    assert encode("<|image_pad|>") == [IMAGE_PAD]
    assert encode("1932") == [16, 24, 18, 17]  # "1", "9", "3", "2": one token per digit
    for i, (content, _) in enumerate(tokenizer.ADDED_TOKENS):
        assert encode(content) == [151643 + i], content


def test_ids_tokenizers_lib(raw_tok: Tokenizer) -> None:
    _check_ids(lambda s: raw_tok.encode(s).ids)
    assert raw_tok.get_vocab_size() == 151665


def test_ids_transformers(hf_tok) -> None:
    _check_ids(lambda s: hf_tok(s)["input_ids"])
    assert type(hf_tok).__name__ == "Qwen2Tokenizer"
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.bos_token) == (IM_END, 151643, None)
    special = {t.content for t in hf_tok.added_tokens_decoder.values() if t.special}
    assert "<|image_pad|>" in special and "<tool_call>" not in special


@pytest.mark.parametrize("text", ROUNDTRIP)
def test_roundtrip(raw_tok: Tokenizer, hf_tok, text: str) -> None:
    assert raw_tok.decode(raw_tok.encode(text).ids) == text
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == text


def test_matches_tiktoken(tiny_ckpt: Path) -> None:
    """The recovered merges reproduce tiktoken's rank-order BPE on the same ranks and regex."""
    tiktoken = pytest.importorskip("tiktoken")
    raw_tok = Tokenizer.from_file(str(tiny_ckpt / "gse" / "tokenizer.json"))
    ranks = tokenizer.load_ranks(tokenizer.qwen_ranks_path())
    enc = tiktoken.Encoding("qwen", pat_str=tokenizer.QWEN_PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={})
    texts = [*ROUNDTRIP, Path(tokenizer.__file__).read_text(), Path(tiny.__file__).read_text()]
    for text in texts:
        for content, _ in tokenizer.ADDED_TOKENS:  # the sources quote them; tiktoken has none here
            text = text.replace(content, "")
        text = unicodedata.normalize("NFC", text)  # tiktoken has no normaliser
        assert raw_tok.encode(text).ids == enc.encode_ordinary(text)


def test_tokenizer_build_is_deterministic(tmp_path: Path, tiny_ckpt: Path) -> None:
    fresh = tokenizer._tokenizer_json_text.__wrapped__(tokenizer.qwen_ranks_path())  # bypass the cache
    assert fresh == (tiny_ckpt / "gse" / "tokenizer.json").read_text(encoding="utf-8")
    tokenizer.build_qwen_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        assert (tmp_path / name).read_bytes() == (tiny_ckpt / "gse" / name).read_bytes()


def test_chat_template(processor, tiny_ckpt: Path) -> None:
    assert processor.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == CHAT_TEXT
    shipped = json.loads((tiny_ckpt / "gse" / "chat_template.json").read_text())
    assert shipped == {"chat_template": tokenizer.QWEN25_VL_CHAT_TEMPLATE}


def _image_inputs(processor):
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return processor(images=[image], text=[CHAT_TEXT], return_tensors="pt")


def test_processor_image_tokens(processor) -> None:
    inputs = _image_inputs(processor)
    grid = inputs["image_grid_thw"]  # (1, 3): t, h, w in 14-px patches
    assert grid.tolist() == [[1, 4, 4]]  # 64 px -> smart_resize 56 px -> 4x4 patches
    ids = inputs["input_ids"][0]
    assert int((ids == IMAGE_PAD).sum()) == int(grid.prod()) // 4  # 2x2 patch merge
    assert torch.equal(inputs["mm_token_type_ids"][0], (ids == IMAGE_PAD).long())
    assert processor.image_processor.size["longest_edge"] == 12845056


def test_model_loads_and_generates(processor, tiny_ckpt: Path) -> None:
    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_ckpt / "gse", output_loading_info=True
    )
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.dtype == torch.float32
    assert model.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    inputs = _image_inputs(processor)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    n_new = out.shape[1] - inputs["input_ids"].shape[1]
    assert 1 <= n_new <= 3


def test_sam2_checkpoint_loads(tiny_ckpt: Path) -> None:
    from sam2.build_sam import build_sam2

    record = json.loads((tiny_ckpt / "sam2" / "sam2.json").read_text())
    assert record == {"config": "configs/sam2/sam2_hiera_t.yaml", "checkpoint": "sam2_hiera_tiny.pt"}
    ckpt = tiny_ckpt / "sam2" / record["checkpoint"]
    model = build_sam2(record["config"], ckpt_path=str(ckpt), device="cpu")  # raises on missing keys
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert list(saved) == ["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name


def test_weights_are_random_and_distinct(tiny_ckpt: Path) -> None:
    from safetensors.torch import load_file

    gse = load_file(tiny_ckpt / "gse" / "model.safetensors")
    lpr = load_file(tiny_ckpt / "lpr" / "model.safetensors")
    assert gse.keys() == lpr.keys()
    # 5.x saves the hub layout (model.layers.*, visual.*), not its module tree (model.language_model.*)
    assert "model.embed_tokens.weight" in gse and "visual.patch_embed.proj.weight" in gse
    assert "lm_head.weight" not in gse  # tied to the embedding
    for name, value in gse.items():
        assert torch.isfinite(value).all(), name
        assert value.numel() == 1 or float(value.std()) > 0, f"{name} is constant"
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(gse[name], lpr[name])


def test_tiny_json(tiny_ckpt: Path) -> None:
    record = json.loads((tiny_ckpt / "tiny.json").read_text())
    assert (record["seed"], record["size"]) == (0, "tiny")
    assert record["versions"]["transformers"] == transformers.__version__
    assert record["preset"]["hidden"] == 64


def test_same_seed_same_bytes_other_seed_differs(tiny_ckpt: Path, tmp_path: Path) -> None:
    """Rebuild in a fresh interpreter (other hash seed) and compare every file; then seed 1."""
    code = "import sys; from finers_rt.export.tiny import make_tiny; make_tiny(sys.argv[1], seed=0)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True, env=env)
    assert _sha256_tree(tmp_path / "again") == _sha256_tree(tiny_ckpt)

    tiny.make_tiny(tmp_path / "other", seed=1)
    base, other = _sha256_tree(tiny_ckpt), _sha256_tree(tmp_path / "other")
    for name in ("gse/model.safetensors", "lpr/model.safetensors", "sam2/sam2_hiera_tiny.pt"):
        assert base[name] != other[name], name
    assert base["gse/tokenizer.json"] == other["gse/tokenizer.json"]


def test_make_tiny_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "gse").mkdir()
    (tmp_path / "gse" / "notes.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        tiny.make_tiny(tmp_path)


def test_presets() -> None:
    assert tiny.TinyVLMConfig.from_name("bench").hidden == 512
    with pytest.raises(ValueError):
        tiny.TinyVLMConfig.from_name("huge")
    for name, preset in tiny.PRESETS.items():
        config = tiny.qwen25_vl_config(preset)  # validates mrope_section against head_dim
        assert config.vision_config.out_hidden_size == config.text_config.hidden_size, name
        assert config.tie_word_embeddings and config.image_token_id == IMAGE_PAD
