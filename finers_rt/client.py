"""A small client for `finers-rt serve` (stdlib urllib, no extra needed) and `finers-rt query`."""
from __future__ import annotations

import argparse
import base64
import io
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np


class ServiceError(RuntimeError):
    """A non-200 answer: HTTP `status`, the server's `error` code and `detail` message."""

    def __init__(self, status: int, error: str, detail: str, retry_after: str | None = None):
        super().__init__(f"HTTP {status} {error}: {detail}")
        self.status, self.error, self.detail, self.retry_after = status, error, detail, retry_after


class FinersClient:
    """`FinersClient("http://127.0.0.1:8080").segment("frame.jpg", "the red car") -> dict`."""

    def __init__(self, url: str, *, timeout_s: float = 300.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def segment(self, image, question: str, *, task: str = "referring", options: str | None = None,
                return_: str = "rle", request_id: str | None = None,
                force_output: dict[str, str] | None = None) -> dict:
        """image: a path or the file's bytes. Returns Result.to_dict() + `mask` + `request_id`;
        raises ServiceError on 4xx/5xx. force_output only works on a server that allows it."""
        if isinstance(image, (bytes, bytearray)):
            filename, data = "image", bytes(image)
        else:
            filename, data = Path(image).name, Path(image).read_bytes()
        fields = {"question": question, "task": task, "options": options, "return": return_,
                  "request_id": request_id, "force_output": json.dumps(force_output) if force_output else None}
        body, ctype = encode_multipart({k: v for k, v in fields.items() if v is not None}, ("image", filename, data))
        return self._request("POST", "/v1/segment", body, {"Content-Type": ctype})

    def healthz(self) -> dict:
        return self._request("GET", "/healthz")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=self.timeout_s) as r:
            return r.read().decode("utf-8")

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> dict:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)
            except ValueError:
                err = {"error": "http_error", "detail": raw.decode("utf-8", "replace")[:200]}
            raise ServiceError(e.code, err.get("error", "?"), err.get("detail", ""), e.headers.get("Retry-After")) from None


def encode_multipart(fields: dict[str, str | bytes], file: tuple[str, str, bytes]) -> tuple[bytes, str]:
    """Text fields + one (field, filename, bytes) file -> (body, Content-Type header)."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value if isinstance(value, bytes) else value.encode("utf-8"))
        out.write(b"\r\n")
    name, filename, data = file
    safe = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
    out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{safe}"\r\n'
              "Content-Type: application/octet-stream\r\n\r\n".encode())
    out.write(data)
    out.write(f"\r\n--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def rle_decode(rle: dict) -> np.ndarray:
    """COCO uncompressed RLE {"size": [h, w], "counts": [...]} -> (h, w) bool (runs column-major)."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1  # runs alternate 0, 1, 0, ... starting with zeros
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h}*{w} = {h * w}")
    return flat.reshape((h, w), order="F")


def mask_from_response(body: dict) -> np.ndarray | None:
    """The (H, W) bool mask of a /v1/segment answer (return=rle or mask_png), else None."""
    mask = body.get("mask")
    if not mask:
        return None
    if "counts" in mask:
        return rle_decode(mask)
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(mask["png_base64"])))) > 0


def add_query_parser(sub) -> argparse.ArgumentParser:
    """Register `finers-rt query` on the CLI's subparsers; the handler is `args.func(args)`."""
    p = sub.add_parser("query", help="send one image + question to a running `finers-rt serve`")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the server (default: %(default)s)")
    p.add_argument("--image", required=True, help="image file to upload")
    p.add_argument("--question", required=True)
    p.add_argument("--task", choices=["referring", "reasoning", "option"], default="referring")
    p.add_argument("--options", default=None, help="options text for --task option, e.g. \"['A. red', 'B. blue']\"")
    p.add_argument("--mask-out", type=Path, default=None, help="write the mask as a 0/255 PNG here")
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.set_defaults(func=cmd_query)
    return p


def cmd_query(args) -> None:
    """Print the answer, boxes and per-stage timings of one request (the only printing here)."""
    client = FinersClient(args.url, timeout_s=args.timeout_s)
    res = client.segment(args.image, args.question, task=args.task, options=args.options,
                         return_="rle" if args.mask_out else "none")
    forced = "  (FORCED OUTPUT)" if res.get("forced") else ""
    print(f"request {res['request_id']}  backend {res['backend']} {res['precision']}{forced}")
    print(f"answer: {res['answer']!r}   parse: {res['parse']}")
    print(f"gse box {res['gse_box']}  crop {res['crop_box']}  lpr box {res['lpr_box']}  points {res['points']}")
    print(f"mask area {res['mask_area']} px  sam2 score {res['sam2_score']}")
    for stage, ms in res["timings_ms"].items():
        print(f"  {stage:<14}{ms:>10.1f} ms")
    if args.mask_out:
        from PIL import Image

        Image.fromarray(mask_from_response(res).astype(np.uint8) * 255).save(args.mask_out)
        print(f"wrote {args.mask_out}")
