"""restricted_load: plain data and numpy arrays load; anything that could run code is refused."""
from __future__ import annotations

import io
import os
import pickle
import subprocess

import numpy as np
import pytest

from instsearch.datamodules.restricted_pickle import ALLOWED_GLOBALS, UnsafePickleError, restricted_load, restricted_loads


def sample() -> dict:
    return {"imlist": ["a", "b"], "qimlist": ("q",), "ids": {1, 2}, "frozen": frozenset({"x"}),
            "gnd": [{"bbx": np.array([1.5, 2.0, 30.0, 40.0]), "easy": np.array([0, 1], dtype=np.int32),
                     "hard": np.array([], dtype=np.int64), "junk": [], "grid": np.arange(6.0).reshape(2, 3).T}],
            "scalar": np.float32(0.25), "count": np.int64(7), "raw": b"\x00\xff", "buf": bytearray(b"ab"),
            "empty": b"", "nested": [[1, (2, 3)], {"k": None}]}


def assert_same(a, b) -> None:
    assert type(a) is type(b) or (isinstance(a, np.generic) and isinstance(b, np.generic))
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_and_containers_round_trip(protocol):
    data = sample()
    assert_same(restricted_loads(pickle.dumps(data, protocol=protocol)), data)


def test_path_and_file_object(tmp_path):
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps(sample()))
    assert_same(restricted_load(path), sample())
    assert_same(restricted_load(str(path)), sample())
    with path.open("rb") as f:
        assert_same(restricted_load(f), sample())
    assert_same(restricted_load(io.BytesIO(path.read_bytes())), sample())


class _System:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Popen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


def test_os_system_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"imlist": ["a"], "gnd": [_System(f"touch {marker}")]})
    pickle_file = tmp_path / "evil.pkl"
    pickle_file.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl: refused to load global '(posix|nt)\.system'") as e:
        restricted_load(pickle_file)
    assert e.value.name == "system"
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="subprocess.Popen"):
        restricted_loads(pickle.dumps([_Popen(marker)]))
    assert not marker.exists()


@pytest.mark.parametrize("payload,refused", [
    (b"cbuiltins\neval\n(V__import__('os').system('false')\ntR.", "builtins.eval"),
    (b"cbuiltins\ngetattr\n(cbuiltins\nlist\nVappend\ntR.", "builtins.getattr"),
    (b"c__builtin__\nexec\n(Vx=1\ntR.", "builtins.exec"),  # Python 2 name, mapped then refused
    (b"cnumpy\nload\n(Vx.npy\ntR.", "numpy.load"),
    (b"cnumpy.testing\nrun_module_suite\n)R.", "numpy.testing.run_module_suite"),
    (b"ccopyreg\n_reconstructor\n(cbuiltins\nobject\ncbuiltins\nobject\nNtR.", "copyreg._reconstructor"),
])
def test_other_globals_are_refused(payload, refused):
    with pytest.raises(UnsafePickleError, match=refused.replace(".", r"\.")):
        restricted_loads(payload)


def test_codecs_encode_only_does_latin1():
    assert restricted_loads(b"c_codecs\nencode\n(Vab\nVlatin1\ntR.") == b"ab"
    with pytest.raises(UnsafePickleError, match="encode"):
        restricted_loads(b"c_codecs\nencode\n(Vab\nVrot13\ntR.")


def test_python2_builtin_names_map_to_allowed_containers():
    assert restricted_loads(b"c__builtin__\nset\n((lp0\nI1\naI2\natR.") == {1, 2}


def test_persistent_ids_are_refused():
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "ext" if obj == "secret" else None

    buf = io.BytesIO()
    P(buf).dump(["secret"])
    with pytest.raises(UnsafePickleError, match="persistent"):
        restricted_loads(buf.getvalue())


def test_not_a_pickle_and_missing_file(tmp_path):
    with pytest.raises(pickle.UnpicklingError, match="not a readable pickle"):
        restricted_loads(b"this is text, not a pickle")
    with pytest.raises(FileNotFoundError, match="nothere.pkl"):
        restricted_load(tmp_path / "nothere.pkl")


def test_allow_list_is_small():
    assert all(name.startswith(("numpy", "builtins.", "_codecs.")) for name in ALLOWED_GLOBALS)
    assert "builtins.eval" not in ALLOWED_GLOBALS and "builtins.getattr" not in ALLOWED_GLOBALS
