"""Loading images as RGB in their displayed orientation, refusing what is not a usable image.

Every loader in instsearch goes through :func:`load_rgb`, so EXIF rotation, mode conversion and
the pixel-count guard are decided in one place. A bad file raises :class:`BadImageError`; callers
that must go on (benchmark extraction, dataset conversion, training) record it in a
:class:`BadImageReport`.

What counts as bad: a missing or zero-byte file, a file that is not an image (a text file named
``.jpg``), a corrupt or truncated file, an image whose pixel count exceeds ``max_pixels`` (checked
from the header, before any pixel is decoded) and a pixel format that cannot be turned into RGB.
Truncation is always an error here, even when some other library has switched on PIL's global
``ImageFile.LOAD_TRUNCATED_IMAGES`` leniency (which would silently grey-fill the missing part).

What loads: greyscale, bilevel, palette (with or without transparency), RGBA / LA / PA (composited
on white, the usual display convention), CMYK, 16- and 32-bit integer greyscale, float images,
all returned as 8-bit RGB and rotated as their EXIF orientation tag says, so that pixel
coordinates (and every box) refer to the image as displayed.
"""
from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Decompression-bomb guard: larger than any benchmark image (Oxford's are ~1024 px), far below
# what would exhaust memory. Configurable per call.
MAX_PIXELS = 64_000_000

EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # orientations that swap width and height
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError,
                  Image.DecompressionBombError)


class BadImageError(RuntimeError):
    """The file is missing, empty, truncated, not an image, or too large to decode safely."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # keep (path, reason) through pickling (DataLoader workers re-raise)
        return (type(self), (self.path, self.reason))


# PIL reads ImageFile.LOAD_TRUNCATED_IMAGES at decode time. While any load_rgb call is decoding,
# the flag is held at False (reference-counted, so concurrent loads in threads do not restore it
# under each other's feet); the lock guards only the counter, decoding itself runs in parallel.
_strict_lock = threading.Lock()
_strict_depth = 0
_saved_truncated_flag = False


@contextmanager
def _strict_truncation() -> Iterator[None]:
    global _strict_depth, _saved_truncated_flag
    with _strict_lock:
        if _strict_depth == 0:
            _saved_truncated_flag = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_depth += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_depth -= 1
            if _strict_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_truncated_flag


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise BadImageError(path, "file not found")
    if path.stat().st_size == 0:
        raise BadImageError(path, "zero-byte file")


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``path`` as an 8-bit RGB PIL image in its displayed (EXIF-applied) orientation."""
    path = Path(path)
    _check_file(path)
    try:
        with _strict_truncation(), Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise BadImageError(path, f"{im.width}x{im.height} exceeds the {max_pixels}-pixel limit")
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im, path)
    except BadImageError:
        raise
    except _DECODE_ERRORS as e:
        raise BadImageError(path, f"not a readable image ({type(e).__name__}: {e})") from None


def image_size(path: str | Path, max_pixels: Optional[int] = None) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), reading only the header.

    Cheap, so it cannot see truncation; :func:`load_rgb` is the full check.
    """
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            # before the EXIF: for a PNG, getexif() reads every chunk up to the image end (an
            # eXIf chunk may follow the pixel data), which is the decode the limit guards against
            if max_pixels is not None and w * h > max_pixels:
                raise BadImageError(path, f"{w}x{h} exceeds the {max_pixels}-pixel limit")
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except _DECODE_ERRORS as e:
        raise BadImageError(path, f"not a readable image ({type(e).__name__}: {e})") from None
    return (h, w) if orientation in _TRANSPOSED_ORIENTATIONS else (w, h)


def _to_rgb(im: Image.Image, path: Path) -> Image.Image:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale: map the full 16-bit range onto 8 bits (65535 -> 255) as a viewer
        # does; rescaling by the image's own maximum would brighten dark images. 32-bit integer
        # images whose values exceed 16 bits fall back to their own range.
        a = np.asarray(im).astype(np.float64)
        hi = 65535.0 if a.size == 0 or a.max() <= 65535 else float(a.max())
        a = np.clip(a, 0, None) / hi * 255.0
        return Image.fromarray(a.round().astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=1.0))
        a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(a.round().astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise BadImageError(path, f"pixel mode {mode!r} cannot be converted to RGB ({e})") from None


@dataclass
class BadImageReport:
    """Images skipped because they could not be used; written beside a run's outputs.

    ``spool`` (optional) is a JSON-lines file every :meth:`add` also appends to, so entries
    recorded inside DataLoader worker processes (each holding its own copy of the report) reach
    the main process: call :meth:`collect` there. Appends of one short line with ``O_APPEND``
    are atomic on POSIX, so workers need no lock between them. Entries are unique per path.
    """

    entries: list[dict] = field(default_factory=list)
    spool: Optional[str | Path] = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, error: BadImageError, image_id: str | None = None) -> None:
        entry = {"path": error.path, "image": image_id, "reason": error.reason}
        with self._lock:
            if any(e["path"] == entry["path"] for e in self.entries):
                return
            self.entries.append(entry)
            if self.spool is not None:
                line = (json.dumps(entry) + "\n").encode()
                fd = os.open(self.spool, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)

    def collect(self) -> "BadImageReport":
        """Merge the entries other processes appended to the spool; returns ``self``."""
        if self.spool is None or not Path(self.spool).is_file():
            return self
        with self._lock:
            seen = {e["path"] for e in self.entries}
            for line in Path(self.spool).read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crashed worker
                    continue
                if entry.get("path") not in seen:
                    seen.add(entry["path"])
                    self.entries.append(entry)
        return self

    def __len__(self) -> int:
        return len(self.entries)

    def write(self, path: str | Path) -> Path:
        self.collect()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"skipped": len(self.entries), "images": self.entries}, indent=1) + "\n")
        return path

    # Locks do not pickle; DataLoader workers started with "spawn" pickle the dataset and its report.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
