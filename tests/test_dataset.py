"""Annotation loading, options formatting and the synthetic FineRS-4k generator."""

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from finers_rt.dataset import DatasetError, Sample, load_annotations
from finers_rt.metrics import polygon_mask, size_bucket
from finers_rt.prompts import format_options
from finers_rt.synth import make_synth

N_SYNTH = 9


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    make_synth(out, n=N_SYNTH, seed=0)
    return out


@pytest.fixture(scope="module")
def samples(synth_dir) -> list[Sample]:
    return load_annotations(synth_dir / "annotations.json", synth_dir / "images")


def _shoelace_and_perimeter(poly):
    """Polygon area (px^2) and perimeter (px), written out here independently of synth.py."""
    area2, perim = 0.0, 0.0
    for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1]):
        area2 += x0 * y1 - x1 * y0
        perim += math.hypot(x1 - x0, y1 - y0)
    return abs(area2) / 2, perim


# --- synth round trip ---------------------------------------------------------------------------

def test_synth_round_trip(synth_dir, samples):
    assert len(samples) == N_SYNTH
    assert len({s.image_path for s in samples}) == math.ceil(N_SYNTH / 3)
    assert len({s.sample_id for s in samples}) == N_SYNTH
    for s in samples:
        assert s.image_path.is_absolute() and s.image_path.is_file()
        assert s.image_path.parent == (synth_dir / "images").absolute()
        assert s.question and s.answer
        if s.task == "option":
            assert isinstance(s.options, list) and s.answer in "ABCD"
            assert any(o.startswith(f"{s.answer}. ") for o in s.options)
        else:
            assert s.options is None


def test_synth_polygons_inside_image(samples):
    for s in samples:
        w, h = Image.open(s.image_path).size
        assert (w, h) == (3840, 2160)
        assert len(s.polygon) >= 3
        assert all(0 <= x <= w - 1 and 0 <= y <= h - 1 for x, y in s.polygon), s.sample_id


def test_synth_has_border_objects(samples):
    # Some objects lie within 100 px of an edge so that region clamping gets exercised.
    def near_edge(s):
        xs, ys = [p[0] for p in s.polygon], [p[1] for p in s.polygon]
        return min(xs) < 100 or min(ys) < 100 or max(xs) > 3839 - 100 or max(ys) > 2159 - 100

    assert any(near_edge(s) for s in samples)


def test_synth_area_percent_matches_mask(samples):
    """area_percent is 100 * polygon area / image area, consistent with the rasterised GT mask.

    The GT mask includes a 1 px outline, so it exceeds the geometric area by about half the
    perimeter: more than 5 % for XXS and small XS objects (e.g. a 70 px triangle). So the mask
    is checked within one perimeter of the area for every object, within 5 % for S objects.
    """
    for s in samples:
        area, perim = _shoelace_and_perimeter(s.polygon)
        assert s.area_percent == pytest.approx(100 * area / (3840 * 2160), rel=1e-4)
        mask_px = int(polygon_mask(s.polygon, 2160, 3840).sum())
        assert abs(mask_px - area) <= perim, s.sample_id
        if size_bucket(s.area_percent) == "S":
            assert mask_px / (3840 * 2160) * 100 == pytest.approx(s.area_percent, rel=0.05)


def test_synth_covers_buckets_tasks_attributes(samples):
    assert {size_bucket(s.area_percent) for s in samples} == {"S", "XS", "XXS"}
    assert {s.task for s in samples} == {"referring", "reasoning", "option"}
    qa_attributes = {s.attribute for s in samples if s.task != "referring"}
    assert qa_attributes <= {"colors", "shape", "position", "others"}
    assert len(qa_attributes) >= 3


def test_synth_is_deterministic(synth_dir, tmp_path):
    make_synth(tmp_path, n=N_SYNTH, seed=0)
    for rel in ("annotations.json", "images/synth_0000.jpg"):
        assert (tmp_path / rel).read_bytes() == (synth_dir / rel).read_bytes(), rel


# --- load_annotations ---------------------------------------------------------------------------

def _record(**overrides):
    rec = {"image_path": "a.jpg", "Q": "the red car", "A": "red", "Q-type": "referring",
           "points": [[1, 1], [4, 1], [4, 3]], "attribute": "colors", "area_percent": 0.01}
    rec.update(overrides)
    return rec


def _write(tmp_path, data) -> Path:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_load_bare_list_defaults_and_extra_fields(tmp_path):
    rec = _record(extra_field=[1, 2])
    del rec["attribute"]
    samples = load_annotations(_write(tmp_path, [rec, _record(id=77)]), tmp_path / "imgs")
    assert [s.sample_id for s in samples] == ["0", "77"]
    assert samples[0].attribute == "others"
    assert samples[0].image_path == (tmp_path / "imgs" / "a.jpg").absolute()
    assert samples[0].options is None and samples[0].area_percent == 0.01


def test_load_missing_question_names_record_and_field(tmp_path):
    bad = _record()
    del bad["Q"]
    with pytest.raises(DatasetError, match=r"record 1\b.*'Q'"):
        load_annotations(_write(tmp_path, {"annotations": [_record(), bad]}), tmp_path)


def test_load_bad_task_names_record_and_field(tmp_path):
    with pytest.raises(DatasetError, match=r"record 0\b.*'Q-type'.*'segmentation'"):
        load_annotations(_write(tmp_path, {"annotations": [_record(**{"Q-type": "segmentation"})]}), tmp_path)


@pytest.mark.parametrize(
    "override, field",
    [({"points": [[1, 2, 3]]}, "points"), ({"area_percent": "big"}, "area_percent"),
     ({"options": [1, 2]}, "options"), ({"A": 3}, "A")],
)
def test_load_bad_fields(tmp_path, override, field):
    with pytest.raises(DatasetError, match=f"record 0\\b.*'{field}'"):
        load_annotations(_write(tmp_path, [_record(**override)]), tmp_path)


def test_load_bad_top_level(tmp_path):
    assert issubclass(DatasetError, ValueError)
    with pytest.raises(DatasetError, match="annotations"):
        load_annotations(_write(tmp_path, {"images": []}), tmp_path)


# --- format_options -----------------------------------------------------------------------------

def test_format_options_matches_str_format():
    assert format_options(["A. red", "B. blue"]) == "['A. red', 'B. blue']"
    assert format_options("A. red; B. blue") == "A. red; B. blue"
