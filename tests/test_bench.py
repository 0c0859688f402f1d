"""`finers-rt plan` work model and floors, and `finers-rt bench` on the tiny engines/checkpoints."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from finers_rt.cost import (
    PRECISIONS,
    Cost,
    TextConfig,
    VisionConfig,
    decode_cost,
    prefill_cost,
    vision_cost,
)
from finers_rt.devices import DEVICES
from finers_rt.plan import STAGES, floor, plan
from finers_rt.result import TIMING_KEYS

BF16 = PRECISIONS["bf16"]  # 2 bytes per weight, 2 per activation / KV value

# hidden 8, 1 layer, 2 heads of 4, 1 KV head (KV width 4), intermediate 16, vocab 10, tied
SMALL = TextConfig(hidden=8, layers=1, heads=2, kv_heads=1, intermediate=16, vocab=10, tied=True)


def test_text_params_small_config():
    # matmul weights per layer: q 8*8 + o 8*8 + k 8*4 + v 8*4 + gate/up/down 3*8*16 = 128+64+384 = 576
    assert SMALL.layer_matmul == 576
    # + q/k/v biases 8+4+4 + two norms 2*8 = 608; streamed per pass: 608 + final norm 8 + lm_head 80 = 696
    assert SMALL.layer_params == 608
    assert SMALL.streamed_params == 696
    assert SMALL.params == 696  # tied: the embedding table is the lm_head


def test_prefill_cost_small_config():
    c = prefill_cost(SMALL, 3, BF16)
    # FLOPs = 2 * tokens * matmul weights              = 2*3*576           = 3456
    #       + attention, causal: query i sees i keys -> 1+2+3 = 6 pairs,
    #         4 FLOPs per pair per dim (QK^T, AV) * hidden 8 = 6*4*8     =  192
    #       + lm_head for the last position only       = 2*10*8            =  160
    assert c.flops == 3456 + 192 + 160
    # bytes = weights once 696*2 + KV written (K,V) 2*1 layer*4 dims*3 tokens*2 B = 48
    #       + the input embeddings 3*8*2 = 48
    assert c.bytes == 696 * 2 + 48 + 48


def test_decode_cost_small_config():
    c = decode_cost(SMALL, prompt=3, new_tokens=4, p=BF16)
    # 4 generated tokens = 3 decode steps (the prefill made the first); steps see 4, 5, 6 keys = 15
    # FLOPs = 3 steps * 2 * (576 + lm_head 80) = 3936 + attention 4 * 8 dims * 15 keys = 480
    assert c.flops == 3936 + 480
    # bytes = every step streams all weights: 3 * 696 * 2 = 4176
    #       + KV read (15 positions) and written (3): 2 (K,V) * 4 dims * 18 * 2 B = 288
    assert c.bytes == 4176 + 288


def test_decode_cost_with_a_screened_lm_head():
    """The screened head reads its 80 weights (vocab 10 x hidden 8) in int8 plus 12 B per vocab row."""
    c = decode_cost(SMALL, prompt=3, new_tokens=4, p=BF16, lm_head="screened")
    assert c.flops == 3936 + 480  # the same math
    # per step: the other 616 weights at 2 B + the head 80 * 1 B + 10 rows * 12 B = 1432; 3 steps
    assert c.bytes == 3 * (616 * 2 + 80 + 120) + 288


def test_vision_cost_small_config():
    v = VisionConfig(depth=2, hidden=4, heads=1, intermediate=8, out_hidden=6, fullatt_blocks=(1,), window=56)
    c = vision_cost(v, rows=4, cols=6, p=BF16)
    # 24 patches of 3*2*14*14 = 1176 values; block matmuls 4*4^2 + 3*4*8 = 160
    # linear: 2 * 24 * (1176*4 + 2 blocks * 160) = 241,152
    # window 56 px = 2 merge units = 4 patches: windows 4x4 and 4x2 patches -> 16^2 + 8^2 = 320 pairs
    # attention: 4 * hidden 4 * (full block 24^2 + window block 320) = 14,336
    # merger on 24/4 = 6 tokens: 2 * 6 * (16*16 + 16*6) = 4,224
    assert c.flops == 241_152 + 14_336 + 4_224


def test_floor_is_max_of_compute_and_memory():
    f = floor("x", Cost(flops=2e12, bytes=1e9), peak_tflops=1.0, bandwidth_gbs=1000.0)
    assert (f.compute_ms, f.memory_ms, f.floor_ms, f.bound) == (2000.0, 1.0, 2000.0, "compute")
    f = floor("y", Cost(flops=1e9, bytes=4e9), peak_tflops=1.0, bandwidth_gbs=1000.0)
    assert (f.compute_ms, f.memory_ms, f.floor_ms, f.bound) == (1.0, 4.0, 4.0, "memory")


def test_every_device_number_has_a_source():
    for dev in DEVICES.values():
        specs = [dev.bandwidth_gbs, *dev.peak_tflops.values()]
        assert {"fp32", "bf16", "fp16"} <= set(dev.peak_tflops)
        for spec in specs:
            assert spec.value > 0 and len(spec.source) > 10, (dev.key, spec)
    with pytest.raises(ValueError, match="no fp8"):
        DEVICES["a100"].peak("fp8")  # Ampere has no FP8 tensor cores


def test_plan_7b_a100_prints_every_stage():
    text = plan(model="7b", device="a100")
    for stage in STAGES:
        assert f"\n{stage} " in text
    assert "7.31" in text and "5.57" in text and "A100" in text
    doc = json.loads(plan(model="7b", device="a100", as_json=True))
    by = {s["stage"]: s for s in doc["stages"]}
    # finers-pipeline.md §9: each decode step streams ~15 GB of bf16 weights, ~7.6 ms/token at 2 TB/s
    per_step = by["gse_decode"]["floor_ms"] / 255
    assert 6.5 < per_step < 8.0 and by["gse_decode"]["bound"] == "memory"
    assert by["gse_vision"]["bound"] == "compute"


def test_param_counts_match_the_tiny_checkpoint(tiny_ckpt: Path):
    from finers_rt.cost import VLMConfig

    cfg = VLMConfig.from_dir(tiny_ckpt / "gse")
    raw = (tiny_ckpt / "gse" / "model.safetensors").read_bytes()
    header = json.loads(raw[8: 8 + struct.unpack("<Q", raw[:8])[0]])
    stored = sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    assert cfg.text.params + cfg.vision.params == stored  # tied lm_head is not stored


def test_scripted_text_is_exact(tiny_ckpt: Path):
    from tokenizers import Tokenizer

    from finers_rt.bench_script import count_tokens, min_tokens, scripted_text

    tok = Tokenizer.from_file(str(tiny_ckpt / "gse" / "tokenizer.json"))
    for stage in ("gse", "lpr"):
        lo = min_tokens(tok, stage)
        for n in (lo, lo + 1, 257):
            assert count_tokens(tok, scripted_text(tok, stage, n)) == n - 1  # + <|im_end|> = n
        with pytest.raises(ValueError, match=f">= {lo}"):
            scripted_text(tok, stage, lo - 1)


def _min_pair(folder: Path) -> tuple[int, int]:
    from tokenizers import Tokenizer

    from finers_rt.bench_script import min_tokens

    return tuple(min_tokens(Tokenizer.from_file(str(folder / s / "tokenizer.json")), s) for s in ("gse", "lpr"))


def test_bench_too_few_tokens_fails_before_loading(tiny_engines: Path, capsys):
    from finers_rt.bench import main

    # A valid GSE answer alone is ~43 tokens, LPR's ~72: 8,6 cannot hold a box (and points).
    assert main(["--engines", str(tiny_engines), "--runs", "1", "--warmup", "0", "--decode-tokens", "8,6"]) == 2
    assert "must be >=" in capsys.readouterr().err


def test_bench_ort_writes_one_row(tiny_engines: Path, tmp_path: Path):
    from finers_rt.bench import main

    g, lp = _min_pair(tiny_engines)
    out = tmp_path / "bench.jsonl"
    argv = ["--engines", str(tiny_engines), "--runs", "1", "--warmup", "0", "--decode-tokens", f"{g},{lp}",
            "--out", str(out)]
    assert main(argv) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["tokens"] == {"gse": g, "lpr": lp}  # <|im_end|> included
    assert set(row["timings_ms"]) == set(TIMING_KEYS)
    assert all({"p50", "p90"} <= set(v) for v in row["timings_ms"].values())
    for key in ("decode_ms_per_token", "decode_tokens_per_s", "end_to_end_ms", "peak_rss_mib", "versions",
                "hardware", "git_sha", "timestamp", "runs", "warmup", "decode_tokens", "floor_ms", "backend"):
        assert key in row, key
    assert row["versions"]["onnxruntime"] and row["versions"]["numpy"] and row["hardware"]["cores"] >= 1
    assert set(row["floor_ms"]) == set(STAGES) and row["backend"] == "ort"


def test_bench_compare_ort_vs_torch(tiny_engines: Path, tiny_ckpt: Path, capsys):
    from finers_rt.bench import main

    g, lp = _min_pair(tiny_engines)
    argv = ["--engines", str(tiny_engines), "--checkpoints", str(tiny_ckpt), "--compare", "--runs", "1",
            "--warmup", "0", "--decode-tokens", f"{g},{lp}"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "A/B" in text and "paper: A100" in text
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert [r["backend"] for r in rows] == ["ort", "torch"]
    ratio = rows[0]["compare"]["p50_ratio"]
    assert set(ratio) == set(TIMING_KEYS) and all(v > 0 for v in ratio.values())


def test_sam2_variant_of_engine_folders(tiny_engines: Path, tmp_path: Path):
    from finers_rt.cost_sam2 import sam2_model_in

    assert sam2_model_in(tiny_engines).name == "hiera-t"  # via the manifest's source checkpoints
    (tmp_path / "sam2").mkdir()
    (tmp_path / "sam2" / "sam2_encoder.onnx").symlink_to(tiny_engines / "sam2" / "sam2_encoder.onnx")
    assert sam2_model_in(tmp_path).name == "hiera-t"  # by the fp32 encoder file size
