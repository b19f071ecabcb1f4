"""Offline real photos (scikit-image) and image-file error handling."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from morphoquant.data import DataError, images


def test_real_images_named_rgb():
    got = images.real_images(["astronaut", "camera", "motorcycle"])
    assert [g.name for g in got] == ["astronaut", "camera", "motorcycle"]
    for g in got:
        assert g.image.mode == "RGB" and min(g.image.size) >= 256
        assert g.array.dtype == np.uint8 and g.array.shape[2] == 3
    grey = images.real_images(["camera"], mode="L", as_array=True)
    assert grey[0][0] == "camera" and grey[0][1].ndim == 2


def test_photo_names_offline_only():
    names = images.photo_names()
    assert {"astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"} <= set(names)
    assert len(names) >= 15
    assert "eagle" not in names  # downloaded on demand by skimage: never used


def test_unknown_photo():
    with pytest.raises(DataError, match="available offline"):
        images.real_images(["eagle"])


def test_load_image_errors(tmp_path):
    good = tmp_path / "ok.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good)
    assert images.load_image(good).getpixel((0, 0)) == (1, 2, 3)
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.read_bytes()[:30])
    with pytest.raises(DataError, match="broken.png"):
        images.load_image(bad)
    with pytest.raises(DataError, match="does not exist"):
        images.load_image(tmp_path / "missing.png")
