"""The output parser on the reference's cases and hostile strings. Expected values by hand."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finers_rt.parsing import BAD_JSON, NO_BBOX, NO_JSON, NO_POINTS, OK, parse_output


def test_gse_python_literal_with_think():
    p = parse_output("<think> look left </think><answer>{'bbox': [100,200,356,456], 'response': 'A'}</answer>",
                     2.0, 2.0, want_points=False)
    assert (p.status, p.bbox, p.response, p.think) == (OK, (200, 400, 712, 912), "A", " look left ")


def test_int_truncation_then_python_round_half_even():
    # int(10.7) = 10 -> 15.0; points: round(1.5) = 2, round(4.5) = 4 (half to even), y * 0.5.
    p = parse_output('{"bbox": [10.7, 20, 30, 40], "points_1": [1, 2], "points_2": [3, 4]}',
                     1.5, 0.5, want_points=True)
    assert p.status == OK
    assert p.bbox == (15, 10, 45, 20)
    assert p.points == [(2, 1), (4, 2)]


def test_quote_after_bracket_is_removed_first():
    p = parse_output('{"bbox": [1,2,3,4]", "response": "x"}', 1, 1, want_points=False)
    assert (p.status, p.bbox, p.response) == (OK, (1, 2, 3, 4), "x")


def test_first_flat_object_wins_even_without_answer_tag():
    text = "pre {'bbox': [1,1,2,2]} then {'bbox': [9,9,9,9]}"
    assert parse_output(text, 1, 1, want_points=False).bbox == (1, 1, 2, 2)


def test_nested_braces_fail_like_the_reference():
    p = parse_output('{"a": {"bbox": [1,2,3,4]}}', 1, 1, want_points=False)
    assert p.status == BAD_JSON and p.bbox is None


def test_only_the_first_bbox_key_counts_case_insensitive_and_string_numbers():
    p = parse_output("{'Region_BBox': ['5', 6, 7.9, 8], 'bbox': [1, 1, 1, 1]}", 1, 1, want_points=False)
    assert p.bbox == (5, 6, 7, 8)
    p = parse_output("{'bbox': [1, 2], 'region_bbox': [5, 6, 7, 8]}", 1, 1, want_points=False)
    assert (p.status, p.bbox) == (NO_BBOX, None)


def test_think_is_first_tag_pair_without_angle_brackets_inside():
    assert parse_output("<think>a<b</think><think>c</think>{}", 1, 1, want_points=False).think == "c"


def test_unquoted_response_key_reference_vs_tolerant():
    text = "{'bbox': [10,100,200,210], 'points_1': [30,110], 'points_2': [35,180], response: 'A'}"
    assert parse_output(text, 1, 1, want_points=True).status == BAD_JSON
    p = parse_output(text, 1, 1, want_points=True, tolerant=True)
    assert (p.status, p.bbox, p.points, p.response) == (OK, (10, 100, 200, 210), [(30, 110), (35, 180)], "A")


def test_lpr_missing_points_keeps_box():
    p = parse_output("{'bbox': [0,0,5,5], 'points_1': [1,1]}", 1, 1, want_points=True)
    assert (p.status, p.bbox, p.points) == (NO_POINTS, (0, 0, 5, 5), [])
    p = parse_output("{'bbox': [0,0,5,5], 'points_1': [1,1], 'points_2': [1]}", 1, 1, want_points=True)
    assert (p.status, p.points) == (NO_POINTS, [])


def test_points_only_has_no_bbox_status():
    p = parse_output("{'points_1': [1,1], 'points_2': [2,2]}", 1, 1, want_points=True)
    assert (p.status, p.bbox, p.points) == (NO_BBOX, None, [(1, 1), (2, 2)])


@pytest.mark.parametrize("text,status", [
    ("no json here", NO_JSON),
    ("", NO_JSON),
    ("{}", NO_JSON),  # `{[^}]+}` needs at least one character inside
    ("{'bbox': [1,2,3]}", NO_BBOX),
    ('{"bbox": [1e999, 2, 3, 4]}', NO_BBOX),  # inf is not an int
    ('{"bbox": [true, 2, 3, 4]}', NO_BBOX),
    ("{1, 2, 3}", BAD_JSON),  # a Python set, not a dict
    ('{"bbox": [' + "9" * 5000 + ", 1, 2, 3]}", BAD_JSON),  # over Python's int-string limit
    ("{" + "[" * 100000 + "}", BAD_JSON),
    ("{" * 100000, NO_JSON),
    ("{'bbox': [1,2,3,4], 'response': 7}", OK),
])
def test_hostile_strings_never_raise(text, status):
    assert parse_output(text, 1.0, 1.0, want_points=False).status == status


def test_non_string_input():
    assert parse_output(None, 1, 1, want_points=False).status == NO_JSON


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_fuzz_never_raises(text):
    p = parse_output(text, 2.0, 0.5, want_points=True)
    assert p.status in {OK, NO_JSON, BAD_JSON, NO_BBOX, NO_POINTS}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=5)),
                min_size=0, max_size=6))
def test_fuzz_bbox_values(values):
    p = parse_output("{'bbox': %r, 'response': 'x'}" % (values,), 1.0, 1.0, want_points=False)
    assert p.status in {OK, NO_BBOX, BAD_JSON}
    if p.bbox is not None:
        assert all(isinstance(v, int) for v in p.bbox)
