"""`finers-rt run` on every file of the hostile corpus (tests/data/hostile/make_hostile.py).

Each file ends in exit 0 with result.json, mask.png and overlay.png, or exit 2 with one
`finers-rt run: error: ...` line naming the file and the problem, never a traceback; a valid run
still works afterwards. In-process runs go through `finers_rt.cli.main(argv)` with the tiny engines
loaded once (`_load_pipeline` patched to return them: loading is not what is under test here);
one run goes through a real `python -m finers_rt` subprocess, engine loading included.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from finers_rt import cli

TESTS = Path(__file__).parent
# 3840x2160 frame: GSE [900,500,1156,756] (1920x1080 space) -> crop (1800,1000,2312,1512);
# LPR [10,20,30,40] in 512x512 crop space + (1800,1000) -> (1810,1020,1830,1040).
FULL = {"gse": "<answer>{'bbox': [900,500,1156,756], 'response': 'The object is found.'}</answer>",
        "lpr": "<answer>{'bbox': [10,20,30,40], 'points_1': [15,25], 'points_2': [20,30]}</answer>"}
NO_BOX = {"gse": "<answer>{'response': 'The object is not found.'}</answer>"}  # stops after GSE

# Refused files -> words the error line must contain (besides the file name).
REFUSED = {
    "truncated.jpg": "truncated", "truncated.png": "truncated", "corrupt_header.jpg": "cannot decode",
    "corrupt_scan.jpg": "cannot decode", "zero_bytes.jpg": "cannot decode", "text.jpg": "cannot decode",
    "bomb_header.png": "too large", "bomb_zeros.png": "too large",
}
# Decoded files -> upright (width, height). FULL_RUN ones get boxes: region, LPR, SAM2 and the
# overlay's box drawing run on a 1-pixel and an 8-pixel-wide image.
DECODED = {
    "png16.png": (64, 48), "grayscale.png": (64, 48), "palette.png": (64, 48), "rgba.png": (64, 48),
    "cmyk.jpg": (64, 48), "exif_rotated.jpg": (32, 64), "bad_exif.jpg": (64, 48), "one_pixel.png": (1, 1),
    "tall_8x8000.png": (8, 8000), "animated.gif": (48, 32),
}
FULL_RUN = {"one_pixel.png", "tall_8x8000.png"}


def make_hostile(out: Path) -> dict[str, Path]:
    """tests/data/hostile/make_hostile.py's make_hostile, loaded the way test_serve.py loads it."""
    spec = importlib.util.spec_from_file_location("make_hostile", TESTS / "data" / "hostile" / "make_hostile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_hostile(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    paths = make_hostile(tmp_path_factory.mktemp("hostile"))
    assert set(paths) == set(REFUSED) | set(DECODED), "the corpus changed: classify the new files here"
    return paths


@pytest.fixture(scope="module")
def force_files(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("force")
    files = {"full": FULL, "no_box": NO_BOX,
             "inverted": {"gse": "<answer>{'bbox': [1156,756,900,500], 'response': 'x'}</answer>"},
             "huge": {"gse": "<answer>{'bbox': [1e308, -1e308, 1e308, 1e308], 'response': 'x'}</answer>"}}
    for name, force in files.items():
        (out / f"{name}.json").write_text(json.dumps(force))
    return {name: out / f"{name}.json" for name in files}


@pytest.fixture(scope="module")
def loaded(tiny_engines):
    from finers_rt.pipeline import Pipeline

    pipe = Pipeline.from_engines(tiny_engines, device="cpu")
    yield pipe
    pipe.close()


@pytest.fixture
def run_cli(loaded, tiny_engines, monkeypatch, capsys, tmp_path):
    """run_cli(image, force) -> (exit code, stdout, stderr, out folder), in this process."""
    monkeypatch.setattr(cli, "_load_pipeline", lambda args: loaded)

    def run(image: Path, force: Path):
        out = tmp_path / f"out-{image.name}"
        code = cli.main(["run", "--engines", str(tiny_engines), "--image", str(image), "--question", "the red car",
                         "--force-output", str(force), "--out", str(out)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err, out

    return run


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_file_exits_2_naming_the_problem(run_cli, corpus, force_files, name):
    code, out, err, folder = run_cli(corpus[name], force_files["no_box"])
    assert code == 2, (out, err)
    assert err.startswith("finers-rt run: error: ") and err.count("\n") == 1, err  # one line, no traceback
    assert name in err and REFUSED[name] in err, err
    assert not (folder / "result.json").exists()


@pytest.mark.parametrize("name", sorted(DECODED))
def test_decoded_file_exits_0_with_outputs(run_cli, corpus, force_files, name):
    code, out, err, folder = run_cli(corpus[name], force_files["full" if name in FULL_RUN else "no_box"])
    assert code == 0 and err == "", err
    body = json.loads((folder / "result.json").read_text())
    w, h = DECODED[name]
    assert body["image_size"] == [w, h] and body["mask_shape"] == [h, w] and "FORCED OUTPUT" in out
    assert Image.open(folder / "mask.png").size == (w, h) and (folder / "overlay.png").stat().st_size > 0
    if name in FULL_RUN:  # every stage ran; the region lies inside the image
        x0, y0, x1, y1 = body["crop_box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and body["sam2_score"] is not None
    else:
        assert body["gse_box"] is None and body["mask_area"] == 0


def test_hostile_stage_text_is_a_failed_parse_not_a_crash(run_cli, corpus, force_files):
    """A box past float range used to overflow in the region step (OverflowError, a traceback)."""
    code, _out, err, folder = run_cli(corpus["png16.png"], force_files["huge"])
    assert code == 0 and err == "", err
    body = json.loads((folder / "result.json").read_text())
    assert body["parse"]["gse"] == "no_bbox" and "in range" in body["parse_reason"]["gse"]


def test_inverted_box_from_the_model_still_gives_an_overlay(run_cli, corpus, force_files):
    code, _out, err, _folder = run_cli(corpus["png16.png"], force_files["inverted"])
    assert code == 0, err


def test_valid_run_after_the_corpus(run_cli, tmp_path, force_files):
    frame = tmp_path / "frame.jpg"
    Image.new("RGB", (3840, 2160), (90, 120, 60)).save(frame, quality=90)
    code, _out, err, folder = run_cli(frame, force_files["full"])
    assert code == 0, err
    body = json.loads((folder / "result.json").read_text())
    assert body["gse_box"] == [1800, 1000, 2312, 1512] and body["crop_box"] == [1800, 1000, 2312, 1512]
    assert body["lpr_box"] == [1810, 1020, 1830, 1040] and body["points"] == [[1815, 1025], [1820, 1030]]
    assert body["parse"] == {"gse": "ok", "lpr": "ok"} and body["sam2_score"] is not None


def test_subprocess_refused_file_and_valid_file(tiny_engines, corpus, force_files, tmp_path):
    """The real entry point: engines loaded from disk, a refused file, then a valid one."""
    def run(image: Path):
        argv = [sys.executable, "-m", "finers_rt", "run", "--engines", str(tiny_engines), "--image", str(image),
                "--question", "the red car", "--force-output", str(force_files["no_box"]),
                "--out", str(tmp_path / image.stem)]
        return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=300)

    bad = run(corpus["text.jpg"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.startswith("finers-rt run: error: ") and "text.jpg" in bad.stderr, bad.stderr
    good = run(corpus["grayscale.png"])
    assert good.returncode == 0 and "Traceback" not in good.stderr, good.stderr
    assert json.loads((tmp_path / "grayscale" / "result.json").read_text())["image_size"] == [64, 48]
