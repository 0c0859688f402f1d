"""Request side of `finers-rt serve`: form-field validation, image reading/decoding, mask encoding.

Pure Python/numpy/PIL (no FastAPI): everything here is about turning untrusted multipart fields
into a validated `SegmentRequest` or an `ApiError` with a 4xx, and a Result into a response body.
"""
from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import TASKS
from .image import ImageLoadError, load_image
from .prompts import build_question

FORM_FIELDS = ("image", "image_path", "question", "task", "options", "return", "request_id", "force_output")
RETURNS = ("rle", "mask_png", "none")
MAX_QUESTION_CHARS = 4096  # FineRS questions are one sentence; longer is a mistake or an attack
MAX_FIELD_BYTES = 64 * 1024  # any form field but `image`
MAX_REQUEST_ID = 128
# Warm-up: every stage runs (forced texts give GSE and LPR a box, so region, LPR and SAM2 run too).

FORM_SCHEMA = {
    "type": "object",
    "required": ["question"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "the image file (or image_path)"},
        "image_path": {"type": "string", "description": "a path under the server's --image-root"},
        "question": {"type": "string", "maxLength": MAX_QUESTION_CHARS},
        "task": {"type": "string", "enum": list(TASKS), "default": "referring"},
        "options": {"type": "string", "description": "task 'option' only, e.g. \"['A. red', 'B. blue']\""},
        "return": {"type": "string", "enum": list(RETURNS), "default": "rle",
                   "description": "rle: COCO uncompressed RLE (column-major); mask_png: base64 PNG"},
        "request_id": {"type": "string", "maxLength": MAX_REQUEST_ID, "description": "echoed; made if absent"},
        "force_output": {"type": "string", "description": 'JSON {"gse": text, "lpr": text}; only on servers '
                                                          "started with --force-output-from-request (testing)"},
    },
}


class ApiError(Exception):
    """A request that gets a non-200 answer: `{"error": code, "detail": detail}` with `status`."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}

    def response(self, request_id: str | None = None):
        from fastapi.responses import JSONResponse

        body = {"error": self.code, "detail": self.detail}
        headers = dict(self.headers)
        if request_id:
            body["request_id"] = headers["X-Request-ID"] = request_id
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---------------------------------------------------------------- request parsing


class _Parts:
    """python-multipart callbacks collecting {field name: raw bytes}; limits checked as bytes arrive."""

    def __init__(self, max_image_bytes: int):
        self.fields: dict[str, bytes] = {}
        self._max_image = max_image_bytes
        self._name, self._data, self._hname, self._hvalue, self._disposition = "", bytearray(), b"", b"", b""

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end}

    def _begin(self):
        self._name, self._data, self._disposition = "", bytearray(), b""

    def _header_field(self, data, start, end):
        self._hname += data[start:end]

    def _header_value(self, data, start, end):
        self._hvalue += data[start:end]

    def _header_end(self):
        if self._hname.lower() == b"content-disposition":
            self._disposition = self._hvalue
        self._hname, self._hvalue = b"", b""

    def _headers_finished(self):
        from python_multipart.multipart import parse_options_header

        name = parse_options_header(self._disposition)[1].get(b"name")
        if name is None:
            raise ApiError(400, "malformed_multipart", "a form part has no Content-Disposition name")
        self._name = name.decode("utf-8", "replace")
        if self._name in self.fields:
            raise ApiError(400, "duplicate_field", f"form field {self._name!r} is sent twice")
        if len(self.fields) >= len(FORM_FIELDS):
            raise ApiError(400, "too_many_fields", f"more than {len(FORM_FIELDS)} form fields")

    def _part_data(self, data, start, end):
        self._data += data[start:end]
        limit = self._max_image if self._name == "image" else MAX_FIELD_BYTES
        if len(self._data) > limit:
            what = "image" if self._name == "image" else f"form field {self._name!r}"
            raise ApiError(413, "too_large", f"{what} is larger than the server's limit of {limit} bytes")

    def _part_end(self):
        self.fields[self._name] = bytes(self._data)


async def read_form(request, max_image_bytes: int) -> dict[str, bytes]:
    """multipart/form-data body -> {name: bytes}, streamed; never more than the limits in memory."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        got = ctype.decode("latin-1") or "nothing"  # latin-1: header bytes need not be UTF-8
        raise ApiError(415, "unsupported_media_type", f"send multipart/form-data, not {got}")
    declared = int(request.headers.get("content-length") or 0)
    if declared > max_image_bytes + len(FORM_FIELDS) * MAX_FIELD_BYTES:
        raise ApiError(413, "too_large", f"request body is {declared} bytes; the image limit is {max_image_bytes}")
    parts = _Parts(max_image_bytes)
    parser = MultipartParser(params[b"boundary"], parts.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except FormParserError as e:
        raise ApiError(400, "malformed_multipart", f"cannot parse the multipart body ({e})") from None
    return parts.fields


@dataclass
class SegmentRequest:
    """A validated /v1/segment request. Exactly one of `image` (bytes) and `image_path` is set."""

    request_id: str
    question: str
    task: str = "referring"
    options: str | None = None
    return_: str = "rle"
    image: bytes | None = None
    image_path: str | None = None
    force_output: dict[str, str] | None = None


def parse_fields(raw: dict[str, bytes], *, allow_forced: bool, request_id: str) -> SegmentRequest:
    """Form fields -> SegmentRequest, or ApiError naming the first problem found."""
    unknown = sorted(set(raw) - set(FORM_FIELDS))
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown form field(s) {unknown}; allowed: {list(FORM_FIELDS)}")
    text = {k: _utf8(k, v) for k, v in raw.items() if k != "image"}
    text = {k: v for k, v in text.items() if v != "" or k == "question"}  # empty optional = absent
    req = SegmentRequest(request_id=_request_id(text.get("request_id"), request_id),
                         question=_question(text.get("question")), task=text.get("task", "referring"),
                         options=text.get("options"), return_=text.get("return", "rle"),
                         image=raw.get("image"), image_path=text.get("image_path"))
    if (req.image is None) == (req.image_path is None):
        raise ApiError(400, "image_required", "send exactly one of 'image' (a file) and 'image_path'")
    if req.task not in TASKS:
        raise ApiError(422, "invalid_task", f"task must be one of {list(TASKS)}, got {req.task!r}")
    try:
        build_question("gse", req.task, req.question, req.options)  # the pipeline's own option rules
    except ValueError as e:
        raise ApiError(422, "invalid_options", str(e)) from None
    if req.return_ not in RETURNS:
        raise ApiError(422, "invalid_return", f"return must be one of {list(RETURNS)}, got {req.return_!r}")
    if "force_output" in text:
        req.force_output = _force_output(text["force_output"], allow_forced)
    return req


def _utf8(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_utf8", f"form field {name!r} is not valid UTF-8 "
                                            f"(byte 0x{value[e.start]:02x} at offset {e.start})") from None


def _request_id(given: str | None, default: str) -> str:
    if given is None:
        return default
    if len(given) > MAX_REQUEST_ID or not given.isprintable() or not given.isascii():
        raise ApiError(422, "invalid_request_id", f"request_id must be printable ASCII, at most {MAX_REQUEST_ID} chars")
    return given


def _question(q: str | None) -> str:
    if q is None:
        raise ApiError(422, "missing_question", "form field 'question' is required")
    if not q.strip():
        raise ApiError(422, "empty_question", "the question is empty")
    if len(q) > MAX_QUESTION_CHARS:
        raise ApiError(422, "question_too_long", f"the question is {len(q)} characters; the limit is {MAX_QUESTION_CHARS}")
    return q


def _force_output(text: str, allowed: bool) -> dict[str, str]:
    if not allowed:
        raise ApiError(422, "force_output_disabled",
                       "force_output is a testing switch; this server was not started with --force-output-from-request")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the stack
        data = None
    if not isinstance(data, dict) or set(data) - {"gse", "lpr"} or not all(isinstance(v, str) for v in data.values()):
        raise ApiError(422, "invalid_force_output", 'force_output must be JSON {"gse": "<text>", "lpr": "<text>"}')
    return data


# ---------------------------------------------------------------- image and mask


def read_under_root(root: Path | None, rel: str, max_bytes: int) -> bytes:
    """The bytes of `rel` resolved under `root` (symlinks followed); refused if it leaves the root."""
    if root is None:
        raise ApiError(400, "image_path_disabled", "image_path needs a server started with --image-root; upload 'image'")
    try:
        path = (root / rel).resolve()
        inside = path.is_relative_to(root)
        size = path.stat().st_size if inside and path.is_file() else None
    except (OSError, ValueError):  # embedded NUL, too long, permission
        inside, size = False, None
    if not inside:
        raise ApiError(400, "image_path_refused", f"image_path {rel!r} resolves outside the image root")
    if size is None:
        raise ApiError(400, "image_not_found", f"image_path {rel!r} is not a file under the image root")
    if size > max_bytes:
        raise ApiError(413, "too_large", f"image_path {rel!r} is {size} bytes; the limit is {max_bytes}")
    return path.read_bytes()


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Untrusted bytes -> (H, W, 3) uint8 RGB via `load_image`; the size is checked from the header
    first (PIL only warns between 1x and 2x its pixel limit, so a 1.9x bomb would be decoded)."""
    if not data:
        raise ApiError(400, "empty_image", f"{name} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise ApiError(413, "image_too_large", f"{name}: image too large ({e})") from None
    except UnidentifiedImageError:  # PIL's message would show a BytesIO repr
        raise ApiError(415, "undecodable_image", f"{name}: cannot decode image (not a known image format)") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure on untrusted bytes is the input's fault
        raise ApiError(415, "undecodable_image", f"{name}: cannot decode image ({e})") from None
    if w * h > Image.MAX_IMAGE_PIXELS:
        raise ApiError(413, "image_too_large", f"{name}: image too large ({w}x{h} px; the limit is "
                                               f"{Image.MAX_IMAGE_PIXELS} px)")
    try:
        return load_image(data)
    except ImageLoadError as e:
        raise ApiError(415, "undecodable_image", str(e).replace("<bytes>", name)) from None
    except Exception as e:  # noqa: BLE001 - as above (e.g. struct.error from a broken EXIF block)
        raise ApiError(415, "undecodable_image", f"{name}: cannot decode image ({type(e).__name__}: {e})") from None


def rle_encode(mask: np.ndarray) -> dict:
    """(H, W) bool -> COCO uncompressed RLE: runs over the column-major pixels, zeros first."""
    flat = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1  # first index of every run after the first
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts  # COCO counts always start with a (possibly empty) zero run
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def encode_mask(mask: np.ndarray, how: str):
    if how == "rle":
        return rle_encode(mask)
    if how == "mask_png":  # 8-bit 0/255 as `finers-rt run` writes mask.png
        buf = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255).save(buf, "PNG")
        return {"png_base64": base64.b64encode(buf.getvalue()).decode("ascii")}
    return None


def response_body(res, req: SegmentRequest) -> dict:
    body = res.to_dict()
    body.update(request_id=req.request_id, mask_format=req.return_, mask=encode_mask(res.mask, req.return_))
    return body


