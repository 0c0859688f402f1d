"""dynamic_box, crop and paste on hand-computed cases (interior, borders, tiny images, rounding)."""
import numpy as np
import pytest

from finers_rt.region import crop, dynamic_box, paste_mask, to_original

W, H = 3840, 2160


@pytest.mark.parametrize("bbox,w,h,clamp,shift", [
    # interior: centre (1128, 928), side 512
    ((1000, 800, 1256, 1056), W, H, (872, 672, 1384, 1184), (872, 672, 1384, 1184)),
    # top-left border: clamp shrinks, shift moves
    ((0, 0, 100, 100), W, H, (0, 0, 306, 306), (0, 0, 512, 512)),
    # bottom-right border: the last row/column is never included by clamp
    ((3800, 2100, 3840, 2160), W, H, (3564, 1874, 3839, 2159), (3328, 1648, 3840, 2160)),
    # a box larger than 512 sets the side (800)
    ((100, 100, 900, 400), W, H, (100, 0, 900, 650), (100, 0, 900, 800)),
    # half-way rounding is Python's (half to even): round(-255.5) = -256, round(256.5) = 256
    ((0, 0, 1, 1), 1000, 1000, (0, 0, 256, 256), (0, 0, 512, 512)),
    # image smaller than 512 px
    ((10, 10, 50, 50), 300, 200, (0, 0, 286, 199), (0, 0, 300, 200)),
    # box entirely outside: clamp gives an empty crop -> the whole image
    ((5000, 5000, 5100, 5100), W, H, (0, 0, W, H), (3328, 1648, 3840, 2160)),
])
def test_dynamic_box(bbox, w, h, clamp, shift):
    assert dynamic_box(bbox, w, h, "clamp") == clamp
    assert dynamic_box(bbox, w, h, "shift") == shift


def test_bad_mode():
    with pytest.raises(ValueError, match="clamp"):
        dynamic_box((0, 0, 1, 1), 10, 10, "wrap")


def test_crop_paste_round_trip():
    img = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    box = (2, 1, 5, 4)
    assert crop(img, box).shape == (3, 3, 3)
    assert crop(img, box)[0, 0, 0] == img[1, 2, 0]
    m = np.ones((3, 3), dtype=bool)
    full = paste_mask(m, box, 6, 8)
    assert full.sum() == 9 and full[1:4, 2:5].all() and full.shape == (6, 8)


def test_to_original_adds_crop_origin():
    assert to_original((1, 2, 3, 4), (100, 50, 612, 562)) == (101, 52, 103, 54)
    assert to_original((7, 9), (100, 50, 612, 562)) == (107, 59)
