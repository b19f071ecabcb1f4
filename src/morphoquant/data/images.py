"""Real photographs available offline: the images bundled with scikit-image (``skimage.data``).

Only images whose files ship inside the scikit-image wheel are used; the ones ``skimage.data`` would download
(eagle, brain, kidney, lily, ...) are never requested, so nothing here touches the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

__all__ = ["PHOTOS", "NamedImage", "load_image", "photo_names", "real_images"]

# name -> (skimage.data function, bundled file it reads, what it shows).
PHOTOS: dict[str, tuple[str, str, str]] = {
    "astronaut": ("astronaut", "astronaut.png", "portrait of astronaut Eileen Collins (colour)"),
    "camera": ("camera", "camera.png", "man with a camera (grey)"),
    "chelsea": ("chelsea", "chelsea.png", "a cat (colour)"),
    "coffee": ("coffee", "coffee.png", "a cup of coffee (colour)"),
    "coins": ("coins", "coins.png", "Greek coins (grey)"),
    "moon": ("moon", "moon.png", "lunar surface (grey)"),
    "page": ("page", "page.png", "scanned book page (grey)"),
    "text": ("text", "text.png", "photographed text (grey)"),
    "hubble_deep_field": ("hubble_deep_field", "hubble_deep_field.jpg", "Hubble deep field (colour)"),
    "immunohistochemistry": ("immunohistochemistry", "ihc.png", "stained tissue micrograph (colour)"),
    "retina": ("retina", "retina.jpg", "human retina fundus photo (colour)"),
    "rocket": ("rocket", "rocket.jpg", "rocket on a launch pad (colour)"),
    "motorcycle": ("stereo_motorcycle", "motorcycle_left.png", "motorcycle, left stereo view (colour)"),
    "brick": ("brick", "brick.png", "brick wall texture (grey)"),
    "grass": ("grass", "grass.png", "grass texture (grey)"),
    "gravel": ("gravel", "gravel.png", "gravel texture (grey)"),
    "cell": ("cell", "cell.png", "cell micrograph (grey)"),
    "microaneurysms": ("microaneurysms", "microaneurysms.png", "retinal microaneurysms (grey)"),
    "clock": ("clock", "clock_motion.png", "motion-blurred clock (grey)"),
}


@dataclass(frozen=True)
class NamedImage:
    """A named real photo as an RGB (or ``mode``) PIL image."""

    name: str
    image: Image.Image
    description: str = ""

    @property
    def array(self) -> np.ndarray:
        """The image as a uint8 array (H, W, C) or (H, W)."""
        return np.asarray(self.image, dtype=np.uint8)


def _skimage_data():
    try:
        import skimage.data as sk_data
    except ImportError as e:
        raise DataError(
            "scikit-image is not installed; `pip install scikit-image` to get its bundled photos"
        ) from e
    return sk_data


def photo_names() -> list[str]:
    """Names of the photos whose files are bundled with the installed scikit-image (usable offline)."""
    root = Path(_skimage_data().__file__).parent
    return [name for name, (_, fname, _) in PHOTOS.items() if (root / fname).is_file()]


def _as_pil(arr: np.ndarray, name: str, mode: str) -> Image.Image:
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":  # skimage convention: floats in [0, 1]
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim not in (2, 3):
        raise DataError(f"skimage photo {name!r} has unexpected shape {arr.shape}")
    return Image.fromarray(arr).convert(mode)


def real_images(
    names: list[str] | None = None, mode: str = "RGB", as_array: bool = False
) -> list[NamedImage] | list[tuple[str, np.ndarray]]:
    """Real photos from ``skimage.data``, in :data:`PHOTOS` order (or the order of ``names``).

    ``mode`` is a PIL mode ("RGB" turns grey photos into three equal channels, "L" gives grey).  Returns
    :class:`NamedImage` objects, or ``(name, uint8 array)`` pairs when ``as_array`` is true.  Unknown names or
    names whose file is not bundled (it would need a download) raise :class:`DataError`; with ``names=None``
    such photos are skipped.
    """
    sk_data = _skimage_data()
    available = photo_names()
    if names is None:
        names = available
    else:
        bad = [n for n in names if n not in available]
        if bad:
            raise DataError(
                f"photos {bad} are unknown or not bundled with scikit-image (they would need a "
                f"download); available offline: {', '.join(available)}"
            )
    out = []
    for name in names:
        func, fname, desc = PHOTOS[name]
        try:
            arr = getattr(sk_data, func)()
        except Exception as e:  # a damaged scikit-image install: name the file
            raise DataError(
                f"cannot read skimage photo {name!r} ({fname}): {e}; reinstall scikit-image"
            ) from e
        if func == "stereo_motorcycle":
            arr = arr[0]  # (left, right, disparity)
        img = _as_pil(arr, name, mode)
        out.append((name, np.asarray(img)) if as_array else NamedImage(name, img, desc))
    return out


def load_image(path: Path | str, mode: str = "RGB") -> Image.Image:
    """Reads an image file fully into memory as a PIL image in ``mode``; a missing, truncated or corrupt file
    raises :class:`DataError` naming it."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except FileNotFoundError as e:
        raise DataError(f"image file {path} does not exist") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"image file {path} is corrupt or not an image ({e}); delete it so it is fetched again"
        ) from e
