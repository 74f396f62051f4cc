"""cached_reads: in one process (bd batch) each feature store is read once; copies handed out."""

from __future__ import annotations

import numpy as np
import pytest

from bd.features import store
from bd.features.store import cached_reads, read_store, write_store
from bd.workflow import batch


@pytest.fixture
def counted(monkeypatch):
    """Counts the real reads behind read_store."""
    calls = []
    real = store._read_store

    def counting(path, with_features):
        calls.append((path.name, with_features))
        return real(path, with_features)

    monkeypatch.setattr(store, "_read_store", counting)
    return calls


def make(path, value=1.0, n=5):
    feats = np.full((n, 3), value, np.float16)
    return write_store(path, feats, np.arange(2 * n).reshape(n, 2), {"encoder": "x"})


def test_a_store_is_read_once_inside_cached_reads_and_copies_are_handed_out(tmp_path, counted):
    path = make(tmp_path / "a.zarr")
    with cached_reads():
        first = read_store(path)
        first.features[:] = 7  # a caller changing its copy changes nothing for the next
        first.attrs["encoder"] = "changed"
        second = read_store(path)
        read_store(path, with_features=False)
        read_store(path, with_features=False)
    assert counted == [("a.zarr", True), ("a.zarr", False)]
    assert np.array_equal(second.features, np.ones((5, 3), np.float16)) and second.attrs["encoder"] == "x"
    assert np.array_equal(second.coords, np.arange(10).reshape(5, 2))
    read_store(path)
    read_store(path)
    assert len(counted) == 4  # outside: every call reads


def test_a_rewritten_store_is_read_again(tmp_path, counted):
    path = make(tmp_path / "a.zarr")
    with cached_reads():
        assert read_store(path).features[0, 0] == 1
        make(path, value=2.0)
        assert read_store(path).features[0, 0] == 2
    assert len(counted) == 2


def test_stores_beyond_the_cache_budget_are_read_each_time(tmp_path, counted, monkeypatch):
    monkeypatch.setattr(store, "READ_CACHE_BYTES", 100)  # a 5 x 3 float16 store + coords is 110 bytes
    path = make(tmp_path / "a.zarr")
    with cached_reads():
        read_store(path)
        read_store(path)
    assert len(counted) == 2


def test_bd_batch_reads_each_store_once_across_its_commands(tmp_path, counted, monkeypatch):
    path = make(tmp_path / "a.zarr")
    monkeypatch.setattr("bd.cli.main", lambda argv: read_store(path) and 0)
    jobs = [{"argv": ["train"], "log": str(tmp_path / f"{i}.log")} for i in range(3)]
    assert batch.run_jobs(jobs) == 0
    assert counted == [("a.zarr", True)]
    assert store._READ_CACHE is None  # closed after the batch
