"""Write the hostile-input corpus for the service and `Pipeline.run` into a folder.

The files are generated at test time (never committed): `python make_hostile.py OUT` or
`make_hostile(OUT) -> {case: path}`. `HOSTILE_FIELDS` holds the hostile form fields; each case is
the form fields to send with a valid image (bytes values are sent raw, e.g. invalid UTF-8).
"""
from __future__ import annotations

import argparse
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Form-field cases: name -> fields overriding a valid referring request.
HOSTILE_FIELDS: dict[str, dict[str, str | bytes]] = {
    "empty_question": {"question": ""},
    "huge_question": {"question": "the red car " * 1667},  # 20,004 characters
    "quotes_braces_controls": {"question": "the 'red' \"car\" {Q} {OPTIONS} {'bbox': [1]} \\ \x00\x01\x1b[31m\t\r\n"},
    "invalid_utf8": {"question": b"the red \xff\xfe car \xc3\x28"},
    "bad_task": {"task": "segmentation"},
    "options_on_referring": {"options": "['A. red', 'B. blue']"},
    "option_without_options": {"task": "option"},
    "unknown_field": {"colour": "red"},
    "bad_return": {"return": "polygon"},
}


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (compresses like a photo, not like noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int, *, full_idat: bool) -> bytes:
    """8-bit grayscale PNG declaring width x height. full_idat: real zero rows (a few KB of zlib
    per 10 Mpx); else a one-row IDAT (the header alone is the attack)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # bit depth 8, colour type 0 (L)
    rows = height if full_idat else 1
    comp = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + width zero pixels
    idat = b"".join(comp.compress(row) for _ in range(rows)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _exif_rotated_jpeg() -> bytes:
    """64x32 pixels stored, EXIF orientation 6 (rotate 90 clockwise to view): upright is 32x64."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_rgb(64, 32, 3), "JPEG", exif=exif.tobytes(), quality=90)


def _bad_exif_jpeg() -> bytes:
    """A valid JPEG with a garbage APP1 Exif segment inserted after SOI."""
    jpg = _encode(_rgb(64, 48, 4), "JPEG")
    payload = b"Exif\x00\x00II*\x00" + b"\xff\x13\x37" * 20
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpg[:2] + app1 + jpg[2:]


def _animated_gif() -> bytes:
    frames = [_rgb(48, 32, s).convert("P") for s in range(3)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def hostile_files() -> dict[str, bytes]:
    """case name -> file bytes (the name's suffix is the file suffix)."""
    jpg = _encode(_rgb(640, 480, 1), "JPEG", quality=90)
    png = _encode(_rgb(320, 240, 2), "PNG")
    rng = np.random.default_rng(5)
    scan = bytearray(jpg)  # scan data overwritten from 60 % on; headers intact
    cut = int(len(jpg) * 0.6)
    scan[cut:-2] = rng.integers(0, 256, len(jpg) - 2 - cut, dtype=np.uint8).tobytes()
    gray16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    rgba = _rgb(64, 48, 6).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))))
    return {
        "truncated.jpg": jpg[: len(jpg) // 2],
        "truncated.png": png[: len(png) // 2],
        "corrupt_header.jpg": jpg[:20] + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "corrupt_scan.jpg": bytes(scan),
        "zero_bytes.jpg": b"",
        "text.jpg": b"this is not an image, just text with a .jpg name\n",
        "png16.png": _encode(Image.fromarray(gray16), "PNG"),
        "grayscale.png": _encode(_rgb(64, 48, 7).convert("L"), "PNG"),
        "palette.png": _encode(_rgb(64, 48, 8).convert("P"), "PNG"),
        "rgba.png": _encode(rgba, "PNG"),
        "cmyk.jpg": _encode(_rgb(64, 48, 9).convert("CMYK"), "JPEG"),
        "exif_rotated.jpg": _exif_rotated_jpeg(),
        "bad_exif.jpg": _bad_exif_jpeg(),
        "one_pixel.png": _encode(_rgb(1, 1, 10), "PNG"),
        "tall_8x8000.png": _encode(_rgb(8, 8000, 11), "PNG"),
        "bomb_header.png": bomb_png(100_000, 100_000, full_idat=False),  # 10 Gpx declared, ~100 bytes
        "bomb_zeros.png": bomb_png(6_000, 6_000, full_idat=True),  # 36 Mpx, 1-2x PIL's limit: only warns
        "animated.gif": _animated_gif(),
    }


def make_hostile(out: str | Path) -> dict[str, Path]:
    """Write every hostile file into `out`; returns case name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in hostile_files().items():
        paths[name] = out / name
        paths[name].write_bytes(data)
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    paths = make_hostile(args.out)
    print(f"wrote {len(paths)} hostile files to {args.out}")


if __name__ == "__main__":
    main()
