"""FineRS-4k metrics against hand-computed values (none of the expectations come from the code)."""

import json

import numpy as np
import pytest

from finers_rt.metrics import (
    SampleScore,
    intersection_union,
    option_correct,
    polygon_mask,
    qa_correct,
    reasoning_correct,
    size_bucket,
    summarize,
)

# --- polygon_mask -------------------------------------------------------------------------------

def test_rectangle_includes_outline():
    # Corners (1,1)-(4,3): columns 1..4 and rows 1..3 inclusive (outline drawn) = 4 * 3 = 12 px.
    m = polygon_mask([[1, 1], [4, 1], [4, 3], [1, 3]], 8, 8)
    assert m.shape == (8, 8) and m.dtype == bool
    assert m.sum() == 12
    assert m[1:4, 1:5].all()


def test_right_triangle_pixel_count():
    # Vertices (1,1), (5,1), (1,5): pixels with x, y >= 1 and x + y <= 6, i.e. rows y = 1..5
    # hold 5, 4, 3, 2, 1 pixels = 15 (the hypotenuse outline included).
    m = polygon_mask([[1, 1], [5, 1], [1, 5]], 8, 8)
    assert m.sum() == 15
    ys, xs = np.nonzero(m)
    assert (xs >= 1).all() and (ys >= 1).all() and (xs + ys <= 6).all()


def test_degenerate_polygons():
    assert polygon_mask([], 6, 7).shape == (6, 7)
    assert not polygon_mask([], 6, 7).any()
    line = polygon_mask([[1, 2], [5, 2]], 6, 7)  # horizontal segment x = 1..5 on row 2
    assert line.sum() == 5 and line[2, 1:6].all()
    point = polygon_mask([[3, 4]], 6, 7)
    assert point.sum() == 1 and point[4, 3]


def test_polygon_clipped_and_float_points():
    # A square larger than the 8x8 image covers all of it.
    assert polygon_mask([[-3, -3], [20, -3], [20, 20], [-3, 20]], 8, 8).sum() == 64
    m = polygon_mask([[1.25, 1.5], [4.75, 1.5], [3.0, 5.5]], 8, 8)
    assert 0 < m.sum() < 64


# --- intersection / union -----------------------------------------------------------------------

def test_intersection_union_hand_masks():
    pred = np.zeros((4, 4), bool)
    gt = np.zeros((4, 4), bool)
    pred[0:2, 0:2] = True  # 4 px
    gt[0:2, 1:3] = True  # 4 px, overlapping pred in column 1 -> I = 2, U = 4 + 4 - 2 = 6
    assert intersection_union(pred, gt) == (2, 6)
    assert intersection_union(np.zeros((4, 4), bool), gt) == (0, 4)


def test_intersection_union_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        intersection_union(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


# --- buckets and QA checks ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "area, bucket",
    [(0.055, "XS"), (0.0551, "S"), (0.017, "XS"), (0.0169, "XXS"), (0.03, "XS"), (1.0, "S"), (0.0, "XXS")],
)
def test_size_bucket_boundaries(area, bucket):
    assert size_bucket(area) == bucket


@pytest.mark.parametrize(
    "response, gt, expected",
    [
        ("A", "a", True),
        ("(b)", "b", True),
        ("the answer is c.", "c", True),
        ("cab", "a", False),
        ("", "a", False),
        ("B. blue", "B", True),
        ("x ( y", "(", True),  # escaped gt: "(" is a literal, not a regex group
    ],
)
def test_option_correct(response, gt, expected):
    assert option_correct(response, gt) is expected


@pytest.mark.parametrize(
    "response, gt, expected",
    [
        ("white", "white", True),
        ("it is whte", "white", True),  # ratio("whte", "white") = 2*4/9 = 0.889
        ("black", "white", False),
        ("", "white", False),
        ("The object is WHITE", "White", True),
    ],
)
def test_reasoning_correct(response, gt, expected):
    assert reasoning_correct(response, gt) is expected


def test_qa_correct_dispatch():
    assert qa_correct("option", "(a)", "A") is True
    assert qa_correct("reasoning", "red", "red") is True
    assert qa_correct("referring", "The object is found.", "x") is None


# --- summarize ----------------------------------------------------------------------------------

def _score(sid, task, attr, area, inter, union, correct, gse="ok", lpr="ok"):
    return SampleScore(sid, task, attr, area, inter, union, "", correct, gse, lpr)


def test_summarize_three_samples():
    scores = [
        _score("s", "option", "colors", 0.1, 2, 6, True),  # S: IoU 2/6
        _score("xs", "reasoning", "colors", 0.03, 0, 10, False, gse="no_json", lpr=None),  # empty pred
        _score("xxs", "referring", "shape", 0.01, 0, 0, None),  # U == 0 -> contributes 1
    ]
    r = summarize(scores)
    # gIoU = (1/3 + 0 + 1) / 3 = 4/9; cIoU = (2 + 0 + 0) / (6 + 10 + 0) = 1/8.
    assert r["giou"] == pytest.approx(4 / 9, abs=1e-5)
    assert r["ciou"] == pytest.approx(0.125, abs=1e-9)
    assert r["buckets"]["S"] == {"giou": pytest.approx(1 / 3, abs=1e-5), "ciou": pytest.approx(1 / 3), "n": 1}
    assert r["buckets"]["XS"] == {"giou": 0.0, "ciou": 0.0, "n": 1}
    assert r["buckets"]["XXS"]["giou"] == 1.0 and r["buckets"]["XXS"]["ciou"] == 0.0
    assert r["option_acc"] == 1.0 and r["reasoning_acc"] == 0.0
    assert r["per_attribute"] == {"colors": {"acc": 0.5, "n": 2}}  # referring is not a QA sample
    assert r["counts"] == {"total": 3, "referring": 1, "reasoning": 1, "option": 1}
    assert r["parse_failures"] == {"gse": {"no_json": 1}, "lpr": {}}
    json.dumps(r)  # results.json content must serialise as is


def test_summarize_per_attribute_and_parse_failures():
    scores = [
        _score("1", "option", "colors", 0.1, 1, 1, True, lpr="no_bbox"),
        _score("2", "reasoning", "colors", 0.1, 1, 1, False, lpr="no_bbox"),
        _score("3", "option", "shape", 0.1, 1, 1, True, lpr="empty"),
        _score("4", "reasoning", "position", 0.1, 1, 1, None, gse="no_json", lpr=None),  # no answer
        _score("5", "option", "others", 0.1, 1, 1, False, gse="bad_bbox"),
    ]
    r = summarize(scores)
    assert r["per_attribute"] == {
        "colors": {"acc": 0.5, "n": 2},
        "others": {"acc": 0.0, "n": 1},
        "position": {"acc": 0.0, "n": 1},
        "shape": {"acc": 1.0, "n": 1},
    }
    assert r["option_acc"] == pytest.approx(2 / 3)
    assert r["reasoning_acc"] == 0.0
    assert r["parse_failures"] == {"gse": {"bad_bbox": 1, "no_json": 1}, "lpr": {"empty": 1, "no_bbox": 2}}
    # Every sample is S-sized, so XS and XXS keep their keys with n = 0 and null metrics.
    assert r["buckets"]["XS"] == {"giou": None, "ciou": None, "n": 0}
    assert r["buckets"]["XXS"] == {"giou": None, "ciou": None, "n": 0}


def test_summarize_without_samples():
    r = summarize([])
    assert r["giou"] is None and r["ciou"] is None
    assert r["option_acc"] is None and r["reasoning_acc"] is None
    assert r["counts"] == {"total": 0, "referring": 0, "reasoning": 0, "option": 0}
    assert r["per_attribute"] == {}


def test_summarize_referring_only_has_no_accuracy():
    r = summarize([_score("r", "referring", "others", 0.02, 3, 4, None)])
    assert r["option_acc"] is None and r["reasoning_acc"] is None
    assert r["giou"] == pytest.approx(0.75, abs=1e-5)
