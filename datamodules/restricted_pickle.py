"""Loading pickled annotation files (e.g. the revisited Oxford/Paris ``gnd_*.pkl``) without running code.

``pickle.load`` calls whatever global a file names (``os.system``, ``builtins.eval``, ...), so a
downloaded ``.pkl`` is a program, not data. :func:`restricted_load` runs the standard unpickler
with a ``find_class`` that resolves only the globals plain data needs:

* numpy array / dtype / scalar reconstruction, under both the numpy 1.x (``numpy.core``) and the
  numpy 2.x (``numpy._core``) module names, including ``_frombuffer`` that protocol-5 pickles use;
* ``_codecs.encode``, which protocol-2 pickles use to carry raw bytes (numpy array payloads) —
  replaced by a wrapper that only performs the ``latin1`` round trip those pickles need;
* the builtin containers (``dict``, ``list``, ``tuple``, ``set``, ``frozenset``, ``bytearray``)
  and ``bytes`` (protocol-2 pickles rebuild empty byte strings, e.g. an empty array's payload,
  by calling it).

Python 2 names (``__builtin__.set``) are mapped to their Python 3 names first, as
``pickle.Unpickler.find_class`` does with ``fix_imports``; the allow-list applies to the result.

Anything else raises :class:`UnsafePickleError` naming the refused global. ``find_class`` runs
when the GLOBAL / STACK_GLOBAL opcode is read, before the REDUCE that would call the object, so a
refused file has executed nothing.
"""
from __future__ import annotations

import _compat_pickle
import builtins
import codecs
import io
import os
import pickle
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

__all__ = ["UnsafePickleError", "RestrictedUnpickler", "restricted_load", "restricted_loads", "ALLOWED_GLOBALS"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing from it was called."""

    def __init__(self, module: str, name: str, source: str = "<pickle>"):
        super().__init__(
            f"{source}: refused to load global '{module}.{name}' (only numpy arrays/dtypes/scalars and "
            "builtin containers are allowed in annotation pickles)")
        self.module = module
        self.name = name
        self.source = source


def _numpy_core() -> Any:
    # numpy 2 moved numpy.core to numpy._core (the old name still imports, with a warning).
    return getattr(np, "_core", None) or np.core


def _from_core(submodule: str, name: str) -> Callable[[], Any]:
    return lambda: getattr(getattr(_numpy_core(), submodule), name)


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` limited to the latin1 bytes round trip of protocol-2 pickles."""
    if encoding not in ("latin1", "latin-1", "iso-8859-1") or not isinstance(obj, str):
        raise UnsafePickleError("_codecs", f"encode(..., {encoding!r})")
    return codecs.encode(obj, "latin1", errors)


# (module, name) -> resolver returning the object. Resolution is lazy so that both numpy module
# spellings map onto whatever this numpy provides, without importing deprecated aliases.
_RESOLVERS: dict[tuple[str, str], Callable[[], Any]] = {}
for _core in ("numpy.core", "numpy._core"):
    _RESOLVERS[(f"{_core}.multiarray", "_reconstruct")] = _from_core("multiarray", "_reconstruct")
    _RESOLVERS[(f"{_core}.multiarray", "scalar")] = _from_core("multiarray", "scalar")
    _RESOLVERS[(f"{_core}.numeric", "_frombuffer")] = _from_core("numeric", "_frombuffer")
_RESOLVERS[("numpy", "ndarray")] = lambda: np.ndarray
_RESOLVERS[("numpy", "dtype")] = lambda: np.dtype
_RESOLVERS[("_codecs", "encode")] = lambda: _latin1_encode
for _name in ("dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes"):
    _RESOLVERS[("builtins", _name)] = (lambda n=_name: getattr(builtins, n))

ALLOWED_GLOBALS: frozenset[str] = frozenset(f"{m}.{n}" for m, n in _RESOLVERS)


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves only :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file: IO[bytes], source: str = "<pickle>", **kwargs: Any):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        # The base class maps Python 2 names inside its own find_class, which this one replaces,
        # so do the same mapping here. (The C unpickler does not expose the protocol; mapping
        # always is harmless: the mapped name must still pass the allow-list.)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        resolver = _RESOLVERS.get((module, name))
        if resolver is None:
            raise UnsafePickleError(module, name, self.source)
        return resolver()

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("<persistent_id>", repr(pid), self.source)


def restricted_load(path_or_file: str | os.PathLike[str] | IO[bytes], *, encoding: str = "latin1") -> Any:
    """Unpickle a file (path or binary file object) allowing only plain data and numpy arrays.

    ``encoding='latin1'`` is what numpy needs to read arrays from Python 2 pickles.
    Raises :class:`UnsafePickleError` for any other global, :class:`FileNotFoundError` for a
    missing path, and :class:`pickle.UnpicklingError` for a file that is not a pickle.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        path = Path(path_or_file)
        if not path.is_file():
            raise FileNotFoundError(f"pickle file not found: {path}")
        with path.open("rb") as f:
            return _load(f, str(path), encoding)
    return _load(path_or_file, str(getattr(path_or_file, "name", "<pickle>")), encoding)


def restricted_loads(data: bytes, *, encoding: str = "latin1") -> Any:
    """:func:`restricted_load` for an in-memory pickle."""
    return _load(io.BytesIO(data), "<bytes>", encoding)


def _load(f: IO[bytes], source: str, encoding: str) -> Any:
    try:
        return RestrictedUnpickler(f, source=source, encoding=encoding).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise pickle.UnpicklingError(f"{source}: not a readable pickle of plain data ({type(e).__name__}: {e})") from None
