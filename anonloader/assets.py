"""Real sample photos that ship inside installed packages (never copied into this repo).

- ``t1``: insightface's ``data/images/t1.jpg``, six people around a table (1280x886).
- ``tom_hanks``: insightface's ``data/images/Tom_Hanks_54745.png``, a 112x112 aligned face.
- ``astronaut``: scikit-image's ``skimage.data.astronaut()``, one face, public domain (512x512).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from anonloader.errors import ConfigError

__all__ = ["SAMPLE_PHOTOS", "sample_photo", "sample_photo_path", "sample_photos"]

#: name -> (package, path inside the package)
_PACKAGE_FILES = {
    "t1": ("insightface", "data/images/t1.jpg"),
    "tom_hanks": ("insightface", "data/images/Tom_Hanks_54745.png"),
}
SAMPLE_PHOTOS = ("t1", "astronaut", "tom_hanks")


def sample_photo_path(name: str) -> Path | None:
    """Path of a packaged photo file, or None for photos that a package only gives as arrays."""
    if name not in SAMPLE_PHOTOS:
        raise ConfigError(f"unknown sample photo {name!r}; choose one of {', '.join(SAMPLE_PHOTOS)}")
    if name not in _PACKAGE_FILES:
        return None
    package, relative = _PACKAGE_FILES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"sample photo {name!r} ships with the {package!r} package, which is not installed; "
            f"run: pip install {package}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ConfigError(f"sample photo {name!r} is missing from the installed {package!r} ({path})")
    return path


def sample_photo(name: str) -> Image.Image:
    """A packaged photo as an RGB PIL image."""
    path = sample_photo_path(name)
    if path is not None:
        with Image.open(path) as image:
            return image.convert("RGB")
    if importlib.util.find_spec("skimage") is None:
        raise ConfigError(f"sample photo {name!r} ships with scikit-image; run: pip install scikit-image")
    from skimage import data

    return Image.fromarray(np.asarray(data.astronaut(), dtype=np.uint8)).convert("RGB")


def sample_photos(names: tuple[str, ...] = SAMPLE_PHOTOS) -> dict[str, Image.Image]:
    """Several packaged photos by name, as RGB PIL images."""
    return {name: sample_photo(name) for name in names}
