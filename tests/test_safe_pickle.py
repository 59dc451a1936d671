"""The restricted unpickler bounds what a reference pickle may allocate, checked before anything is built."""
from __future__ import annotations

import pickle
import resource
import time

import numpy as np
import pytest

from tuneshift.errors import TuneshiftError
from tuneshift.plugins.saliency.safe_pickle import (MIN_BUDGET, PickleTooLargeError, UnsafePickleError,
                                                    restricted_load)

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


class _Call:
    """Pickles as ``func(*args)``, optionally followed by ``__setstate__(state)``."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("payload, what", [
    (_Call(bytearray, (2_000_000_000,)), "bytearray"),
    (_Call(bytes, (2_000_000_000,)), "bytes"),
    (_Call(np.ndarray, ((50_000, 50_000),)), "ndarray"),
    (_Call(_reconstruct, (np.ndarray, (10 ** 10,), b"b")), "_reconstruct"),
    (_Call(_reconstruct, (np.ndarray, (0,), b"b"), (1, (10 ** 9,), np.dtype(object), False, [])), "state"),
    (_Call(list, ("x" * (2 << 20),)), "list"),  # 2 M characters -> 2 M list entries
])
def test_allocation_bombs_are_refused_before_allocating(payload, what):
    data = pickle.dumps({"ID": "x", "Explain": payload}, protocol=2)
    assert len(data) < 5 << 20
    before, started = _peak_rss_mb(), time.perf_counter()
    with pytest.raises(PickleTooLargeError, match=f"refusing to build.*{what}" if what != "state" else "the state"):
        restricted_load(data)
    assert time.perf_counter() - started < 1.0
    assert _peak_rss_mb() - before < 200  # nothing near the requested gigabytes was touched


def test_the_129_byte_bytearray_pickle_is_refused_with_a_clear_error():
    data = pickle.dumps({"ID": "lima_1", "Input": ["x"], "Output": ["y"], "Explain": _Call(bytearray, (2 * 10 ** 9,))},
                        protocol=2)
    assert len(data) == 129
    with pytest.raises(PickleTooLargeError) as err:
        restricted_load(data)
    assert "2000000000 bytes" in str(err.value) and str(MIN_BUDGET) in str(err.value)
    assert isinstance(err.value, TuneshiftError)  # the command line prints it without a traceback


def test_a_huge_dtype_and_newobj_are_refused():
    with pytest.raises(PickleTooLargeError, match="dtype"):
        restricted_load(pickle.dumps(_Call(np.dtype, ("V2000000000",))))
    newobj = b"\x80\x02c__builtin__\nbytes\nq\x00J\x00\x945w\x85q\x01\x81q\x02."  # bytes.__new__(bytes, 2e9)
    with pytest.raises(UnsafePickleError, match="NEWOBJ"):
        restricted_load(newobj)


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_legitimate_arrays_load_under_every_protocol(protocol):
    explain = np.random.default_rng(0).integers(0, 11, size=(300, 200))  # 480 kB of int64
    obj = {"ID": "p", "Input": ["\u2581a"] * 300, "Output": ["b"] * 200, "Explain": explain,
           "extra": (1.5, True, None, {3}, frozenset({4}), b"x", bytearray(b"yz"), 2 + 1j, np.float32(0.5))}
    got = restricted_load(pickle.dumps(obj, protocol=protocol))
    np.testing.assert_array_equal(got["Explain"], explain)
    assert got["extra"] == obj["extra"] and got["Input"] == obj["Input"]


def test_the_budget_grows_with_the_pickle():
    big = np.zeros(12 << 20, dtype=np.uint8)  # 12 MiB: over a 1 MiB budget, within 16x its own pickle
    data = pickle.dumps(big, protocol=4)
    with pytest.raises(PickleTooLargeError):
        restricted_load(data, max_bytes=1 << 20)
    assert restricted_load(data).shape == big.shape
