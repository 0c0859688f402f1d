#!/usr/bin/env bash
# The light runtime: a venv with only the core dependencies (no extras, so no torch) runs
# `finers-rt run` on an engine folder exported by the full environment.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/finers-rt make-tiny "$work/ckpt"
.venv/bin/finers-rt export --checkpoints "$work/ckpt" --out "$work/engines" > "$work/export.log"
.venv/bin/finers-rt make-synth "$work/synth" --n 1
python3 -m venv "$work/core"
"$work/core/bin/python" -m pip install -q .
img=$(ls "$work"/synth/images/*.jpg | head -n 1)
cat > "$work/force.json" <<'JSON'
{"gse": "<answer>{'bbox': [900,500,1156,756], 'response': 'The object is found.'}</answer>",
 "lpr": "<answer>{'bbox': [10,20,30,40], 'points_1': [15,25], 'points_2': [20,30]}</answer>"}
JSON
"$work/core/bin/finers-rt" run --engines "$work/engines" --image "$img" --question "the red car" \
  --force-output "$work/force.json" --out "$work/out"
"$work/core/bin/python" - "$work/out/result.json" <<'PY'
import json, sys, importlib.util
r = json.load(open(sys.argv[1]))
assert r["backend"] == "ort" and r["parse"] == {"gse": "ok", "lpr": "ok"}, r["parse"]
assert r["lpr_box"] == [1810, 1020, 1830, 1040], r["lpr_box"]
assert importlib.util.find_spec("torch") is None, "torch is installed in the core venv"
print("core-only runtime OK: ort run without torch installed")
PY
