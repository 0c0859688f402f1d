"""Property fuzzing of the two parsers that read untrusted text: the stage-output parser (with the
region clamp the pipeline applies to its boxes) and the /v1/segment request parser.

Each property runs twice: `test_fuzz` (default tier: 300 derandomised examples each, seconds) and
`test_fuzz_full` (marker fuzz_full, FUZZ_EXAMPLES examples each, default 100,000; random seed):
    pytest -m fuzz_full tests/test_fuzz.py -s --hypothesis-show-statistics
"""
import json
import logging
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finers_rt.config import PRESETS, REGION_MODES, TASKS
from finers_rt.parsing import (
    BAD_JSON,
    MAX_COORD,
    NO_BBOX,
    NO_JSON,
    NO_POINTS,
    OK,
    parse_output,
)
from finers_rt.region import crop, dynamic_box, to_original
from finers_rt.segment import prompt_arrays
from finers_rt.serve_request import (
    FORM_FIELDS,
    MAX_FIELD_BYTES,
    MAX_QUESTION_CHARS,
    MAX_REQUEST_ID,
    RETURNS,
    ApiError,
    parse_fields,
    read_form,
)

STATUSES = {OK, NO_JSON, BAD_JSON, NO_BBOX, NO_POINTS}
MIN_REGIONS = sorted({cfg.min_region for cfg in PRESETS.values()})

# ---------------------------------------------------------------- stage output text

_NUMBERS = st.one_of(
    st.integers(-(10**6), 10**6),
    st.integers(-(10**400), 10**400),  # past float range: the scaling overflowed here once
    st.floats(),  # nan, inf, 1.8e308, subnormals
    st.from_regex(r"-?[0-9]{1,400}(\.[0-9]{0,3})?", fullmatch=True),  # numeric strings: int() parses them
)
_SCALARS = _NUMBERS | st.booleans() | st.none() | st.text(max_size=4)
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=6) | st.tuples(inner, inner)
                       | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=12)
# Box- and point-shaped values most of the time, so that the coordinate path is what gets fuzzed.
_COORDS = st.one_of(st.lists(_NUMBERS, min_size=4, max_size=4), st.lists(_NUMBERS, min_size=2, max_size=2),
                    st.lists(_SCALARS, min_size=1, max_size=5), st.text(min_size=2, max_size=4), _VALUES)
_KEYS = st.sampled_from(["bbox", "BBox_2d", "region_bbox", "points_1", "points_2", "Points", "response"]) \
    | st.text(max_size=10)


def _render(obj: dict, how: str) -> str:
    if how == "json":
        return json.dumps(obj)  # NaN / Infinity too: Python's json.loads reads them back
    text = repr(obj)
    return text.replace("'", "") if how == "bare" else text  # bare: keys unquoted (tolerant mode)


# Strategies are built once, here: composites that build them per draw spend most of their time
# in Hypothesis' strategy validation.
_BOOL, _TEXT, _SHORT_TEXT = st.booleans(), st.text(), st.text(max_size=10)
_OBJECTS = st.dictionaries(_KEYS, _COORDS, max_size=6)
_RENDER = st.sampled_from(["json", "repr", "bare"])
_THINK = st.sampled_from(["", "<think>looking</think>", "<think>a<b</think>"])
_INDEX = st.integers(0, 2**20)  # taken modulo a length drawn just before


@st.composite
def stage_text(draw) -> str:
    """What a VLM might emit: free text, or a dict literal with hostile values inside tags."""
    if draw(_BOOL):
        return draw(_TEXT)
    body = _render(draw(_OBJECTS), draw(_RENDER))
    if draw(_BOOL):
        body = body.replace("]", ']"')  # the reference strips `]"` first
    return draw(_SHORT_TEXT) + draw(_THINK) + f"<answer>{body}</answer>" + draw(_SHORT_TEXT)


_SCALE = st.floats(min_value=1 / 2048, max_value=64.0)  # image px per model unit (w / 1920, crop / 512)
_SIDE = st.integers(1, 12000) | st.sampled_from([1, 2, 511, 512, 513])  # image width or height, px
_MODE, _MIN_SIDE, _STAGE_TEXT = st.sampled_from(REGION_MODES), st.sampled_from(MIN_REGIONS), stage_text()


@st.composite
def parse_case(draw):
    return {"text": draw(_STAGE_TEXT), "fx": draw(_SCALE), "fy": draw(_SCALE), "tolerant": draw(_BOOL),
            "image": (draw(_SIDE), draw(_SIDE)), "mode": draw(_MODE), "min_side": draw(_MIN_SIDE),
            "lpr_text": draw(_STAGE_TEXT)}


def _check_parsed(p, want_points: bool) -> None:
    assert p.status in STATUSES and isinstance(p.reason, str) and isinstance(p.response, str)
    if p.bbox is not None:
        assert len(p.bbox) == 4 and all(type(v) is int and abs(v) <= MAX_COORD for v in p.bbox), p.bbox
    assert p.status != OK or p.bbox is not None
    assert len(p.points) in (0, 2) and (want_points or not p.points)
    assert all(len(pt) == 2 and all(type(v) is int and abs(v) <= MAX_COORD for v in pt) for pt in p.points)


def prop_parse_then_clamp(case: dict) -> None:
    """parse_output never raises and gives ints; the region the pipeline cuts from a GSE box is a
    non-empty box inside the image; the LPR answer in that crop maps back and prompts SAM2."""
    gse = parse_output(case["text"], case["fx"], case["fy"], want_points=False, tolerant=case["tolerant"])
    _check_parsed(gse, want_points=False)
    if gse.bbox is None:
        return
    w, h = case["image"]
    box = dynamic_box(gse.bbox, w, h, case["mode"], case["min_side"])  # Pipeline.run's clamp
    x0, y0, x1, y1 = box
    assert all(type(v) is int for v in box) and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (gse.bbox, box, w, h)
    region = crop(np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (h, w, 3)), box)  # a view: no H*W memory
    assert region.shape == (y1 - y0, x1 - x0, 3)
    lpr = parse_output(case["lpr_text"], (x1 - x0) / 512, (y1 - y0) / 512, want_points=True,
                       tolerant=case["tolerant"])
    _check_parsed(lpr, want_points=True)
    # The pipeline does not clamp LPR's box and points (reference behaviour): only the mask is
    # confined to the crop (paste_mask). They must still be ints and valid SAM2 prompt arrays.
    for xy in ([lpr.bbox] if lpr.bbox else []) + lpr.points:
        assert all(type(v) is int for v in to_original(xy, box))
    b, pts, labels = prompt_arrays(lpr.bbox, lpr.points)
    assert b is None or (b.shape == (4,) and b.dtype == np.float32)
    assert pts is None or (pts.shape == (2, 2) and labels.tolist() == [1, 1])


_COORD = st.integers(-MAX_COORD, MAX_COORD) | st.integers(-5000, 20000) | st.sampled_from([-MAX_COORD, MAX_COORD])


@st.composite
def clamp_case(draw):
    """Boxes straight into the clamp: any coordinates parse_output can return, in any order."""
    return {"bbox": tuple(draw(_COORD) for _ in range(4)), "image": (draw(_SIDE), draw(_SIDE)),
            "mode": draw(_MODE), "min_side": draw(_MIN_SIDE)}


def prop_clamp_inside_image(case: dict) -> None:
    w, h = case["image"]
    x0, y0, x1, y1 = box = dynamic_box(case["bbox"], w, h, case["mode"], case["min_side"])
    assert all(type(v) is int for v in box) and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (case, box)


# ---------------------------------------------------------------- /v1/segment form fields


def _repeat(alphabet: st.SearchStrategy, lo: int, hi: int) -> st.SearchStrategy:
    """One character repeated lo..hi times: strings at a length limit, cheap to generate."""
    return st.builds(lambda c, k: c * k, alphabet, st.integers(lo, hi))


_CHARS = st.characters()
_BY_FIELD = {  # plausible and hostile values of each form field, as text
    "question": st.text(max_size=30) | _repeat(_CHARS, MAX_QUESTION_CHARS - 2, MAX_QUESTION_CHARS + 2)
    | st.sampled_from(["", " ", "\t\n", "{Q} {OPTIONS}", "the 'red' \"car\" {'bbox': [1]}"]),
    "task": st.sampled_from([*TASKS, "", "segmentation"]) | st.text(max_size=12),
    "options": st.sampled_from(["['A. red', 'B. blue']", "[]", ""]) | st.text(max_size=20),
    "return": st.sampled_from([*RETURNS, "", "polygon"]) | st.text(max_size=10),
    "request_id": st.text(st.characters(max_codepoint=127), max_size=20) | st.text(max_size=8)
    | _repeat(_CHARS, MAX_REQUEST_ID - 2, MAX_REQUEST_ID + 2),
    "force_output": st.builds(json.dumps, st.dictionaries(st.sampled_from(["gse", "lpr", "x"]),
                                                          st.text(max_size=10) | st.integers() | st.none(), max_size=3))
    | _repeat(st.sampled_from("[{"), 900, MAX_FIELD_BYTES)  # nesting past the JSON parser's stack
    | st.text(max_size=20),
    "image_path": st.text(max_size=20),
    "image": st.text(max_size=20),
}


_IMAGE_FIELD = st.sampled_from(["image", "image_path"])
_CHANGED = st.lists(st.sampled_from(FORM_FIELDS), max_size=4, unique=True)
_DROPPED = st.lists(st.sampled_from(FORM_FIELDS), max_size=2, unique=True)
_ONE_IN_10 = st.integers(0, 9)
_RAW_VALUE, _UNKNOWN_NAME, _UNKNOWN_VALUE = st.binary(max_size=12), st.text(max_size=8), st.binary(max_size=8)


@st.composite
def form_case(draw):
    """A valid request with a few fields replaced, added or dropped, so that every check is reached."""
    fields = {"question": b"the red car", draw(_IMAGE_FIELD): b"x"}
    for name in draw(_CHANGED):
        if draw(_ONE_IN_10) == 0:
            fields[name] = draw(_RAW_VALUE)  # invalid UTF-8 too
        else:
            fields[name] = draw(_BY_FIELD[name]).encode("utf-8", "surrogatepass")
    for name in draw(_DROPPED):
        fields.pop(name, None)
    if draw(_ONE_IN_10) == 0:
        fields[draw(_UNKNOWN_NAME)] = draw(_UNKNOWN_VALUE)  # unknown (or duplicate-named) field
    return {"fields": fields, "allow_forced": draw(_BOOL)}


def prop_parse_fields(case: dict) -> None:
    """Only ApiError (a 4xx) ever leaves parse_fields; what it accepts meets the documented limits."""
    raw = case["fields"]
    try:
        req = parse_fields(raw, allow_forced=case["allow_forced"], request_id="server-made-id")
    except ApiError as e:
        assert 400 <= e.status < 500 and e.code and isinstance(e.detail, str), (e.status, e.code)
        return
    assert set(raw) <= set(FORM_FIELDS)
    assert (req.image is None) != (req.image_path is None)
    assert req.question == raw["question"].decode("utf-8") and req.question.strip()
    assert len(req.question) <= MAX_QUESTION_CHARS
    assert req.task in TASKS and req.return_ in RETURNS and (req.options is not None) == (req.task == "option")
    rid = req.request_id
    assert rid == "server-made-id" or (rid.isascii() and rid.isprintable() and len(rid) <= MAX_REQUEST_ID)
    if req.force_output is not None:
        assert case["allow_forced"] and set(req.force_output) <= {"gse", "lpr"}
        assert all(isinstance(v, str) for v in req.force_output.values())


class _Request:
    """What read_form uses of a Starlette request: headers and an async byte stream."""

    def __init__(self, body: bytes, ctype: str, length: str, chunk: int):
        self.headers = {"content-type": ctype, "content-length": length}
        self._body, self._chunk = body, chunk

    async def stream(self):
        for i in range(0, len(self._body), self._chunk):
            yield self._body[i:i + self._chunk]
        yield b""  # Starlette ends the stream with an empty chunk


def _run(coro):
    """Run a coroutine that never suspends (the fake stream does not wait) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("read_form suspended on a stream that never waits")


_PART_NAME = st.sampled_from(FORM_FIELDS) | st.text(max_size=8)
_DISPOSITION = st.sampled_from([
    b'Content-Disposition: form-data; name="%s"', b'Content-Disposition: form-data; name="%s"; filename="f.png"',
    b"Content-Disposition: form-data; name=%s", b"Content-Disposition: form-data", b"X-Other: %s", b""])
_PART_DATA = (st.binary(max_size=40) | _repeat(st.just(b"x"), MAX_FIELD_BYTES - 2, MAX_FIELD_BYTES + 2)
              | _repeat(st.just(b"y"), 900, 1100))  # at the field limit; around the drawn image limit


@st.composite
def part(draw) -> bytes:
    name = draw(_PART_NAME).encode("utf-8", "surrogatepass")
    return draw(_DISPOSITION).replace(b"%s", name) + b"\r\n\r\n" + draw(_PART_DATA)


_BOUNDARY = st.sampled_from([b"bnd", b"----WebKitFormBoundary7MA4YWxk", b"a" * 70]) | st.binary(min_size=1, max_size=8)
_PARTS = st.lists(part(), max_size=len(FORM_FIELDS) + 2)
_CUT = st.sampled_from(["whole", "truncated", "garbage", "random"])
_CTYPE = st.sampled_from(["{valid}", "{unclosed quote}", "multipart/form-data", "application/json", ""]) \
    | st.text(st.characters(max_codepoint=255), max_size=40)  # header values are latin-1
_TINY_CHUNK, _SERVER_CHUNK = st.integers(1, 64), st.sampled_from([1000, 4096, 65536])
_MAX_IMAGE, _GARBAGE, _RANDOM_BODY = st.integers(1, 2048), st.binary(max_size=16), st.binary(max_size=200)


@st.composite
def body_case(draw):
    boundary = draw(_BOUNDARY)
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in draw(_PARTS)) + b"--" + boundary + b"--\r\n"
    cut = draw(_CUT)
    if cut == "truncated":
        body = body[: draw(_INDEX) % (len(body) + 1)]
    elif cut == "garbage":
        i = draw(_INDEX) % (len(body) + 1)
        body = body[:i] + draw(_GARBAGE) + body[i:]
    elif cut == "random":
        body = draw(_RANDOM_BODY)
    valid = "multipart/form-data; boundary=" + boundary.decode("latin-1")
    ctype = draw(_CTYPE).replace("{valid}", valid).replace("{unclosed quote}", valid.replace("=", '="'))
    length = str(len(body)) if draw(_BOOL) else str(draw(_INDEX) * 1000)
    # Tiny chunks split every boundary and header; large bodies get server-sized ones (1 B chunks of
    # 64 KiB would make this test mostly python-multipart's per-call overhead).
    chunk = draw(_TINY_CHUNK if len(body) <= 4096 else _SERVER_CHUNK)
    return {"body": body, "ctype": ctype, "length": length, "chunk": chunk, "max_image": draw(_MAX_IMAGE),
            "allow_forced": draw(_BOOL)}


def prop_read_form_then_parse(case: dict) -> None:
    """The streamed multipart reader: ApiError or fields within the limits, then parse_fields."""
    req = _Request(case["body"], case["ctype"], case["length"], case["chunk"])
    try:
        fields = _run(read_form(req, case["max_image"]))
    except ApiError as e:
        assert 400 <= e.status < 500 and e.code and isinstance(e.detail, str), (e.status, e.code)
        return
    assert len(fields) <= len(FORM_FIELDS)
    for name, value in fields.items():
        assert isinstance(name, str) and isinstance(value, bytes)
        assert len(value) <= (case["max_image"] if name == "image" else MAX_FIELD_BYTES), (name, len(value))
    prop_parse_fields({"fields": fields, "allow_forced": case["allow_forced"]})


# ---------------------------------------------------------------- the runs

PROPERTIES = {
    "parse_output_then_clamp": (prop_parse_then_clamp, parse_case()),
    "clamp_any_box": (prop_clamp_inside_image, clamp_case()),
    "parse_fields": (prop_parse_fields, form_case()),
    "read_form_then_parse_fields": (prop_read_form_then_parse, body_case()),
}


@pytest.fixture(autouse=True)
def _quiet_multipart():
    """python-multipart logs a warning per malformed body: 100,000 of them would fill the capture."""
    logger = logging.getLogger("python_multipart.multipart")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def fuzz(name: str, examples: int, derandomize: bool) -> int:
    """Run PROPERTIES[name] on `examples` generated cases; returns how many calls were made."""
    prop, strategy = PROPERTIES[name]
    calls = 0

    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def run(case):
        nonlocal calls
        calls += 1
        prop(case)

    run()
    return calls


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e300 -> float32 inf
@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_fuzz(name):
    assert fuzz(name, 300, derandomize=True) >= 300


@pytest.mark.fuzz_full
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_fuzz_full(name):
    examples = int(os.environ.get("FUZZ_EXAMPLES", "100000"))
    calls = fuzz(name, examples, derandomize=False)
    print(f"\nfuzz_full {name}: {calls} examples (asked {examples})")
    assert calls >= examples


def test_known_overflow_cases_do_not_raise():
    """The cases fuzzing found: a coordinate that overflows a float (in the scaling, or in the
    region's centre + half side) is a failed parse, not a crash; so are deep JSON and odd headers."""
    for text in ('{"bbox": [1e308, 0, 1, 1]}', '{"bbox": [' + "9" * 400 + ', 0, 1, 1]}',
                 '{"bbox": [1e308, -1e308, 1e308, 1e308]}', '{"bbox": [0, 0, 2147483648, 1]}',
                 "{'bbox': [0, 0, 1, 1], 'points_1': [1e308, 1], 'points_2': [1, 1]}"):
        p = parse_output(text, 2.0, 2.0, want_points=True)
        assert p.status in (NO_BBOX, NO_POINTS) and "in range" in p.reason, (text, p)
    with pytest.raises(ApiError, match="force_output must be JSON"):
        parse_fields({"question": b"q", "image": b"x", "force_output": b"[" * 60000}, allow_forced=True,
                     request_id="r")
    with pytest.raises(ApiError, match="not \xff"):
        _run(read_form(_Request(b"", "\xff", "0", 1), 100))
