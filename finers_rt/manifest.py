"""Engine-folder manifest: what an artifact was built from, and the check that refuses stale ones.

`manifest.json` records the format version, the runtime version, the precision, the opset, the
library versions that built it, a hash of every source checkpoint, the spec digest of every graph
and each graph's verification numbers. Loading checks format and spec digests and that every
file is there; a mismatch raises `StaleEngineError` with the exact command that rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class StaleEngineError(RuntimeError):
    """An engine folder that this runtime cannot use as is; the message says how to rebuild it."""


def hash_tree(root: Path, patterns=("*.json", "*.safetensors", "*.pt", "*.bin")) -> str:
    """sha256 over the names and bytes of the checkpoint files directly in `root` (sorted)."""
    h = hashlib.sha256()
    for p in sorted(q for pat in patterns for q in Path(root).glob(pat)):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def rebuild_command(manifest: dict, engine_dir: Path) -> str:
    src = manifest.get("checkpoints", "CKPT")
    prec = manifest.get("precision", "fp32")
    return f"finers-rt export --checkpoints {src} --out {engine_dir} --precision {prec} --overwrite"


def decoder_attention(engine_dir: Path) -> str:
    """The folder's decoder graph kind, `specs.DECODER_SPECS` key: "onnx" or "gqa" (`finers-rt export
    --decoder-attention`); "onnx" for folders without a manifest or from before the key existed."""
    path = Path(engine_dir) / MANIFEST
    return json.loads(path.read_text()).get("decoder_attention", "onnx") if path.is_file() else "onnx"


def lm_head(engine_dir: Path) -> str:
    """The folder's decoder output head, `specs.LM_HEADS`: "fp32" logits or "screened" bounds
    (`finers-rt export --lm-head`); "fp32" for folders without a manifest or the key."""
    path = Path(engine_dir) / MANIFEST
    return json.loads(path.read_text()).get("lm_head", "fp32") if path.is_file() else "fp32"


def decoder_kv_dtype(engine_dir: Path) -> str:
    """The folder's GQA decoder KV dtype, `specs.KV_DTYPES`: "float32", or "float16" for the fp16 GQA
    export (`export_decoder_gqa(dtype="float16")`); "float32" for folders without a manifest or the key."""
    path = Path(engine_dir) / MANIFEST
    return json.loads(path.read_text()).get("decoder_kv_dtype", "float32") if path.is_file() else "float32"


def write_manifest(engine_dir: Path, manifest: dict) -> None:
    (Path(engine_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def load_manifest(engine_dir: Path, expected_digests: dict[str, str]) -> dict:
    """Read and validate `engine_dir/manifest.json` against the runtime's current graph specs.

    expected_digests: {relative graph path: GraphSpec.digest()} the runtime would build now.
    """
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST
    if not path.is_file():
        raise StaleEngineError(
            f"{engine_dir} has no {MANIFEST}: it is not a finers-rt engine folder. Build one with "
            f"`finers-rt export --checkpoints CKPT --out {engine_dir}`"
        )
    manifest = json.loads(path.read_text())
    cmd = rebuild_command(manifest, engine_dir)
    if manifest.get("format") != FORMAT_VERSION:
        raise StaleEngineError(
            f"{engine_dir} has manifest format {manifest.get('format')}, this runtime reads "
            f"{FORMAT_VERSION}. Rebuild: {cmd}"
        )
    graphs = manifest.get("graphs", {})
    for rel, digest in expected_digests.items():
        if rel not in graphs:
            raise StaleEngineError(f"{engine_dir}: manifest lists no {rel}. Rebuild: {cmd}")
        if graphs[rel]["spec_digest"] != digest:
            raise StaleEngineError(
                f"{engine_dir}/{rel} was exported for another IO spec "
                f"({graphs[rel]['spec_digest']} != {digest}). Rebuild: {cmd}"
            )
        if not (engine_dir / rel).is_file():
            raise StaleEngineError(f"{engine_dir}/{rel} is missing. Rebuild: {cmd}")
    return manifest
