"""Loading images as RGB in their displayed orientation, refusing what is not a usable image.

Every loader in instsearch goes through :func:`load_rgb`, so EXIF rotation, mode conversion and
the pixel-count guard are decided in one place. A bad file raises :class:`BadImageError`; callers
that must go on (benchmark extraction, dataset conversion) record it in a :class:`BadImageReport`.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Decompression-bomb guard: larger than any benchmark image (Oxford's are ~1024 px), far below
# what would exhaust memory. Configurable per call.
MAX_PIXELS = 64_000_000


class BadImageError(RuntimeError):
    """The file is missing, empty, truncated, not an image, or too large to decode safely."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``path`` as an 8-bit RGB PIL image in its displayed (EXIF-applied) orientation."""
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "file not found")
    if path.stat().st_size == 0:
        raise BadImageError(path, "zero-byte file")
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise BadImageError(path, f"{im.width}x{im.height} exceeds the {max_pixels}-pixel limit")
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(path, f"not a readable image ({type(e).__name__}: {e})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as displayed, reading only the header."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(path, f"not a readable image ({type(e).__name__}: {e})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit / 32-bit integer greyscale: rescale to 8 bits rather than clip at 255.
        a = np.asarray(im, dtype=np.float64)
        hi = a.max() if a.size else 1.0
        a = (a / max(hi, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[-1])
        return background
    return im.convert("RGB")


@dataclass
class BadImageReport:
    """Images skipped because they could not be used; written beside a run's outputs."""

    entries: list[dict] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, error: BadImageError, image_id: str | None = None) -> None:
        with self._lock:
            self.entries.append({"path": error.path, "image": image_id, "reason": error.reason})

    def __len__(self) -> int:
        return len(self.entries)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"skipped": len(self.entries), "images": self.entries}, indent=1) + "\n")
        return path
