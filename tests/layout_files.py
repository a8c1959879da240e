"""Tiny files for tiny copies of the distributors' folder layouts (converter and DataModule tests)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

W, H = 40, 30  # every test image is 40x30 unless said otherwise


def jpeg(path: Path, w: int = W, h: int = H, orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (w, h), (len(path.name) * 7 % 255, 90, 160))
    if orientation is None:
        im.save(path, "JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, "JPEG", exif=exif.tobytes())
    return path


def text(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path
