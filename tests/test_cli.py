"""`finers-rt run` and `finers-rt eval` as subprocesses, on tiny checkpoints and synthetic data.

The eval check recomputes every metric independently: I/U from the saved mask PNGs against GT
polygons rasterised here with OpenCV, and gIoU/cIoU/accuracies with the formulas written out below.
"""
from __future__ import annotations

import difflib
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch", reason="needs the [export] extra")
cv2 = pytest.importorskip("cv2", reason="needs the [eval] extra")

from finers_rt.synth import make_synth  # noqa: E402

EVAL_N = 9


def finers(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "finers_rt", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"finers-rt {args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return make_synth(out, n=EVAL_N, seed=3), out / "images"


def test_run_writes_result_mask_overlay(tiny_ckpt, synth, tmp_path):
    ann, images = synth
    sample = json.loads(ann.read_text())["annotations"][0]
    force = tmp_path / "force.json"
    # 3840x2160 frame: GSE [900,500,1156,756] -> (1800,1000,2312,1512) = the crop (512 px);
    # LPR [10,20,30,40] + (1800,1000) -> (1810,1020,1830,1040).
    force.write_text(json.dumps({
        "gse": "<think>a</think><answer>{'bbox': [900,500,1156,756], 'response': 'The object is found.'}</answer>",
        "lpr": "<answer>{'bbox': [10,20,30,40], 'points_1': [15,25], 'points_2': [20,30]}</answer>",
    }))
    out = tmp_path / "out"
    proc = finers("run", "--checkpoints", tiny_ckpt, "--image", images / sample["image_path"],
                  "--question", "the red car", "--force-output", force, "--out", out)
    assert "FORCED OUTPUT" in proc.stdout and "gse_decode" in proc.stdout
    res = json.loads((out / "result.json").read_text())
    assert res["forced"] is True and res["backend"] == "torch"
    assert res["gse_box"] == [1800, 1000, 2312, 1512] and res["crop_box"] == [1800, 1000, 2312, 1512]
    assert res["lpr_box"] == [1810, 1020, 1830, 1040]
    assert res["points"] == [[1815, 1025], [1820, 1030]]
    assert res["parse"] == {"gse": "ok", "lpr": "ok"}
    mask = np.asarray(Image.open(out / "mask.png"))
    assert mask.shape == (2160, 3840) and set(np.unique(mask)) <= {0, 255}
    assert int((mask > 0).sum()) == res["mask_area"]
    assert not mask[:1000].any() and not mask[:, :1800].any()  # only inside the crop
    assert Image.open(out / "overlay.png").size == (1920, 1080)


def test_run_reports_bad_input_clearly(tiny_ckpt, tmp_path):
    proc = finers("run", "--checkpoints", tmp_path, "--image", "x.jpg", "--question", "q", check=False)
    assert proc.returncode == 2 and "gse" in proc.stderr and "make-tiny" in proc.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    proc = finers("run", "--checkpoints", tiny_ckpt, "--image", bad, "--question", "q", check=False)
    assert proc.returncode == 2 and "cannot decode image" in proc.stderr


def _gt_mask(points, h, w):
    m = np.zeros((h, w), np.uint8)
    pts = np.array([points], dtype=np.int32)
    cv2.polylines(m, pts, True, 1, 1)
    cv2.fillPoly(m, pts, 1)
    return m.astype(bool)


def test_eval_forced_from_gt_metrics_recompute(tiny_ckpt, synth, tmp_path):
    ann, images = synth
    out = tmp_path / "eval"
    finers("eval", "--checkpoints", tiny_ckpt, "--annotations", ann, "--images", images,
           "--out", out, "--save-masks", "--force-output-from-gt")
    summary = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "per_sample.jsonl").read_text().splitlines()]
    annos = {str(a.get("id", i)): a for i, a in enumerate(json.loads(ann.read_text())["annotations"])}
    assert len(rows) == EVAL_N == summary["counts"]["total"]

    for r in rows:  # I/U from the saved masks against the GT polygons
        a = annos[r["sample_id"]]
        pred = np.asarray(Image.open(out / "masks" / f"{r['sample_id']}.png")) > 0
        gt = _gt_mask(a["points"], *pred.shape)
        assert (int((pred & gt).sum()), int((pred | gt).sum())) == (r["intersection"], r["union"])
        assert r["parse_status_gse"] == "ok" and r["parse_status_lpr"] == "ok"
        if a["Q-type"] != "referring":  # forced from GT, so the scripted answer is the GT answer
            assert r["response"] == a["A"]

    giou = np.mean([1.0 if r["union"] == 0 else r["intersection"] / (r["union"] + 1e-5) for r in rows])
    ciou = sum(r["intersection"] for r in rows) / (sum(r["union"] for r in rows) + 1e-10)
    assert summary["giou"] == pytest.approx(giou, abs=1e-12)
    assert summary["ciou"] == pytest.approx(ciou, abs=1e-12)

    def correct(r):
        a, resp = annos[r["sample_id"]], r["response"].lower()
        if a["Q-type"] == "option":
            return re.search(r"(?:\b|[\(\[\{'\" ])" + a["A"].lower() + r"(?:\b|[\)\]\}'\" ,.!?])", resp) is not None
        return any(difflib.SequenceMatcher(None, w, a["A"].lower()).ratio() >= 0.8 for w in resp.split())

    for task in ("option", "reasoning"):
        sel = [r for r in rows if annos[r["sample_id"]]["Q-type"] == task]
        assert sel, f"synthetic set has no {task} sample"
        assert summary[f"{task}_acc"] == pytest.approx(np.mean([correct(r) for r in sel]))
        assert summary[f"{task}_acc"] == 1.0  # forced answers are the GT answers
