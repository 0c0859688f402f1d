"""`finers-rt bench` bookkeeping: statistics over runs, the environment a row records, and the
printed tables (per stage, paper comparison, A/B ratios). No timing happens here."""
from __future__ import annotations

import datetime
import os
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .devices import cpu_model
from .plan import PAPER_A100_S, PAPER_SOURCE
from .result import TIMING_KEYS

# Paper groups over our timing keys: GSE = everything up to its decode; the rest is LPR + SAM2.
PAPER_GROUPS = {
    "GSE": ("preprocess", "gse_vision", "gse_prefill", "gse_decode"),
    "LPR + SAM2": ("region", "lpr_vision", "lpr_prefill", "lpr_decode", "sam2_encoder", "sam2_decoder", "postprocess"),
    "end to end": ("total",),
}


def pct(values) -> dict[str, float]:
    """p50 / p90 (numpy linear interpolation), min and max of a list of numbers."""
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "max": float(a.max())}


def summarise(results) -> dict:
    """Statistics over the Results of one configuration (every run has every timing key)."""
    out = {"timings_ms": {k: pct([r.timings_ms[k] for r in results]) for k in TIMING_KEYS}}
    steps = {s: [r.tokens[s] - 1 for r in results] for s in ("gse", "lpr")}  # decode steps per run
    out["decode_ms_per_token"] = {s: pct([r.timings_ms[f"{s}_decode"] / n for r, n in zip(results, steps[s])])
                                  for s in steps}
    out["decode_tokens_per_s"] = {s: pct([n / (r.timings_ms[f"{s}_decode"] / 1e3) for r, n in zip(results, steps[s])])
                                  for s in steps}
    out["end_to_end_ms"] = out["timings_ms"]["total"]
    out["paper_groups_ms"] = {g: pct([sum(r.timings_ms[k] for k in keys) for r in results])
                              for g, keys in PAPER_GROUPS.items()}
    return out


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def versions() -> dict[str, str | None]:
    import onnxruntime as ort

    torch = sys.modules.get("torch")  # only if this process imported it (torch backend)
    # The imported module's version: onnxruntime and onnxruntime-gpu install the same package, and
    # the distribution metadata of a shadowed one would name the wrong build.
    build = "gpu" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    return {"finers_rt": __version__, "python": platform.python_version(),
            "onnxruntime": f"{ort.__version__} ({build})", "numpy": np.__version__,
            "torch": getattr(torch, "__version__", None), "transformers": getattr(
                sys.modules.get("transformers"), "__version__", None)}


def hardware() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cores": cores, "memory_gib": _mem_gib(), "machine": platform.machine(),
            "gpus": gpus()}


def gpus() -> list[str]:
    """'name, driver D, M MiB' per NVIDIA GPU from nvidia-smi; [] where there is none."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [[f.strip() for f in line.split(",")] for line in out.stdout.splitlines() if line.count(",") == 2]
    return [f"{name}, driver {driver}, {mib} MiB" for name, driver, mib in rows] if out.returncode == 0 else []


def _where(row: dict) -> str:
    """The hardware a configuration ran on, as the tables name it."""
    hw = row["hardware"]
    if row["device"] != "cpu" and hw.get("gpus"):
        return f"{hw['gpus'][0].split(',')[0]} ({row['device']}), host {hw['cpu']} x{hw['cores']} cores"
    return f"{hw['cpu']} x{hw['cores']} cores"


def _mem_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        return round(kib / 2**20, 1)
    except (OSError, StopIteration):
        return None


def git_state() -> dict:
    """SHA of the checkout this package runs from, and whether tracked files differ from it."""
    here = Path(__file__).resolve().parent

    def git(*args):
        out = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": bool(dirty) if sha else None}


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---- printing -----------------------------------------------------------------------------


def format_stages(row: dict) -> str:
    """Per-stage p50/p90 with the floor and measured/floor where the row has them."""
    t, floors = row["timings_ms"], row.get("floor_ms") or {}
    lines = [f"{'stage':<14}{'p50 ms':>11}{'p90 ms':>11}{'floor ms':>11}{'x floor':>9}"]
    for k in TIMING_KEYS:
        fl = floors.get(k)
        extra = f"{fl:>11.2f}{t[k]['p50'] / fl:>9.1f}" if fl else f"{'':>20}"
        lines.append(f"{k:<14}{t[k]['p50']:>11.1f}{t[k]['p90']:>11.1f}{extra}")
    for s in ("gse", "lpr"):
        ms, tps = row["decode_ms_per_token"][s], row["decode_tokens_per_s"][s]
        lines.append(f"{s} decode: {row['tokens'][s]} tokens ({row['tokens'][s] - 1} steps), "
                     f"{ms['p50']:.2f} ms/token p50 ({ms['p90']:.2f} p90), {tps['p50']:.1f} tokens/s")
    lines.append(f"end to end {row['end_to_end_ms']['p50']:.1f} ms p50, {row['end_to_end_ms']['p90']:.1f} ms p90; "
                 f"peak RSS {row['peak_rss_mib']:.0f} MiB")
    return "\n".join(lines)


def format_paper(rows: list[dict]) -> str:
    """The paper's A100 seconds beside each configuration's measured p50 seconds."""
    heads = ["paper: A100, 7B"] + [f"{r['label']}: {_where(r)}" for r in rows]
    lines = [f"{'seconds / image':<16}" + "".join(f"{h[:34]:>36}" for h in heads)]
    for g in PAPER_GROUPS:
        vals = [PAPER_A100_S[g]] + [r["paper_groups_ms"][g]["p50"] / 1e3 for r in rows]
        lines.append(f"{g:<16}" + "".join(f"{v:>36.3f}" for v in vals))
    lines.append(f"paper: {PAPER_SOURCE} (up to 1,024 generated tokens per stage). Measured: "
                 + "; ".join(f"{r['label']} = {r['model_summary']}, {r['tokens']['gse']}/{r['tokens']['lpr']} "
                             f"tokens, {_where(r)}" for r in rows))
    return "\n".join(lines)


def format_compare(a: dict, b: dict) -> str:
    lines = [f"A = {a['label']}, B = {b['label']} (p50 ms, runs alternated ABBA in one process)",
             f"{'stage':<14}{'A':>11}{'B':>11}{'A/B':>8}"]
    for k in TIMING_KEYS:
        x, y = a["timings_ms"][k]["p50"], b["timings_ms"][k]["p50"]
        lines.append(f"{k:<14}{x:>11.1f}{y:>11.1f}{(x / y if y else float('nan')):>8.2f}")
    return "\n".join(lines)
