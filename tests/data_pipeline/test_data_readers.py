"""Readers: exactly-once sharding, deterministic shuffles, dtypes, KJT collation; Ray Data."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline import schema
from data_pipeline.local import ParquetBatchReader
from data_pipeline.synthetic import generate_synthetic


def write_split(path, sizes, row_group_rows):
    """Files of the given row counts; timestamp is a global row id."""
    path.mkdir(parents=True, exist_ok=True)
    first = 0
    for f, n in enumerate(sizes):
        ids = np.arange(first, first + n, dtype=np.int64)
        table = pa.table({"user_id": ids % 7, "item_id": ids % 5, "label": ids.astype(np.float32),
                          "timestamp": ids, "sparse_x": ids % 3,
                          "dense_y": (ids / 2).astype(np.float32)}, schema=schema.arrow_schema(["sparse_x"], ["dense_y"]))
        pq.write_table(table, path / f"part-{f:05d}.parquet", row_group_size=row_group_rows)
        first += n
    return first


def epoch_rows(path, world, batch_size, seed, epoch, shuffle=True, drop_last=False, **kw):
    per_rank = []
    for rank in range(world):
        reader = ParquetBatchReader(path, batch_size=batch_size, rank=rank, world_size=world,
                                    shuffle=shuffle, seed=seed, drop_last=drop_last, **kw)
        reader.set_epoch(epoch)
        batches = list(reader)
        assert len(batches) == len(reader) == reader.num_batches_for_rank(rank)
        for r in range(world):
            assert reader.num_batches_for_rank(r) == ParquetBatchReader(
                path, batch_size=batch_size, rank=r, world_size=world, drop_last=drop_last).num_batches_for_rank(r)
        assert all(len(b["timestamp"]) == batch_size for b in batches[:-1])
        per_rank.append(np.concatenate([b["timestamp"] for b in batches]) if batches else np.array([], np.int64))
    return per_rank


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 60), min_size=1, max_size=4), row_group=st.integers(1, 25),
       world=st.sampled_from([1, 2, 3]), batch=st.integers(1, 17), seed=st.integers(0, 5),
       epoch=st.integers(0, 3), buffer=st.sampled_from([1, 10, 1000]))
def test_every_row_exactly_once_per_epoch(tmp_path_factory, sizes, row_group, world, batch, seed,
                                          epoch, buffer):
    path = tmp_path_factory.mktemp("split")
    total = write_split(path, sizes, row_group)
    per_rank = epoch_rows(path, world, batch, seed, epoch, shuffle_buffer_rows=buffer)
    assert np.array_equal(np.sort(np.concatenate(per_rank)), np.arange(total))
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


@pytest.mark.parametrize("world, sizes", [(2, [37]), (3, [10, 21, 4]), (2, [5, 0, 8])])
def test_equal_shares_give_every_rank_the_same_batch_sizes(tmp_path, world, sizes):
    """equal_shares (the trainer's training split): every rank the same rows and batch sizes,
    each row at most once, fewer than world_size rows of the epoch left out."""
    total = write_split(tmp_path, sizes, row_group_rows=6)
    for epoch in range(3):
        per_rank, sizes_of = [], []
        for rank in range(world):
            reader = ParquetBatchReader(tmp_path, batch_size=4, rank=rank, world_size=world,
                                        seed=1, equal_shares=True)
            reader.set_epoch(epoch)
            batches = list(reader)
            assert len(batches) == len(reader)
            sizes_of.append([len(b["timestamp"]) for b in batches])
            per_rank.append(np.concatenate([b["timestamp"] for b in batches]))
        assert all(s == sizes_of[0] for s in sizes_of), sizes_of
        rows = np.concatenate(per_rank)
        assert len(np.unique(rows)) == rows.size == total - total % world


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_exactly_once_fewer_row_groups_than_ranks(tmp_path, world, seed):
    total = write_split(tmp_path, [10], row_group_rows=100)              # one row group
    per_rank = epoch_rows(tmp_path, world, 3, seed, epoch=seed)
    assert np.array_equal(np.sort(np.concatenate(per_rank)), np.arange(total))


def test_shuffle_is_deterministic_per_epoch_and_varies_across_epochs(tmp_path):
    write_split(tmp_path, [300, 200], row_group_rows=50)
    a0 = epoch_rows(tmp_path, 2, 16, seed=3, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(a0, epoch_rows(tmp_path, 2, 16, seed=3, epoch=0)))
    a1 = epoch_rows(tmp_path, 2, 16, seed=3, epoch=1)
    assert not np.array_equal(a0[0], a1[0])
    assert not np.array_equal(a0[0], epoch_rows(tmp_path, 2, 16, seed=4, epoch=0)[0])
    ordered = epoch_rows(tmp_path, 2, 16, seed=3, epoch=0, shuffle=False)
    assert np.array_equal(ordered[0], np.arange(250)) and np.array_equal(ordered[1], np.arange(250, 500))


def test_drop_last_and_dtypes(tmp_path):
    write_split(tmp_path, [103], row_group_rows=20)
    reader = ParquetBatchReader(tmp_path, batch_size=10, drop_last=True, seed=0)
    batches = list(reader)
    assert len(batches) == len(reader) == 10 and all(len(b["label"]) == 10 for b in batches)
    assert {k: v.dtype for k, v in batches[0].items()} == {
        "user_id": np.int64, "item_id": np.int64, "label": np.float32, "timestamp": np.int64,
        "sparse_x": np.int64, "dense_y": np.float32}
    b = batches[0]                           # columns stay aligned through the shuffle
    assert np.array_equal(b["user_id"], b["timestamp"] % 7) and np.allclose(b["dense_y"], b["timestamp"] / 2)
    only = next(iter(ParquetBatchReader(tmp_path, batch_size=4, columns=["user_id", "label"])))
    assert sorted(only) == ["label", "user_id"]


def test_to_kjt(tmp_path):
    from data_pipeline.collate import to_kjt
    write_split(tmp_path, [12], row_group_rows=12)
    batch = next(iter(ParquetBatchReader(tmp_path, batch_size=5, shuffle=False)))
    kjt, dense, label = to_kjt(batch)
    assert kjt.keys() == ["user_id", "item_id", "sparse_x"]
    assert kjt.lengths().tolist() == [1] * 15
    assert kjt["item_id"].values().tolist() == (np.arange(5) % 5).tolist()
    assert kjt["sparse_x"].values().tolist() == (np.arange(5) % 3).tolist()
    assert dense.shape == (5, 1) and dense.dtype.is_floating_point and label.tolist() == [0, 1, 2, 3, 4]
    kjt, dense, _ = to_kjt({k: batch[k] for k in ("user_id", "item_id", "label")}, device="cpu")
    assert dense is None and kjt.keys() == ["user_id", "item_id"]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_ray_reader_yields_the_local_readers_rows(ray_local, tmp_path):
    from data_pipeline.ray_data import iter_numpy_batches, read_split
    generate_synthetic(tmp_path / "ds", users=200, items=100, interactions=5000, clusters=2, chunk_rows=1500)
    ds = read_split(tmp_path / "ds", "train", override_num_blocks=2)
    ray_batches = list(iter_numpy_batches(ds, 256, local_shuffle_seed=0))
    local_batches = list(ParquetBatchReader(tmp_path / "ds" / "train", batch_size=256, seed=0))
    assert {k: v.dtype for k, v in ray_batches[0].items()} == {k: v.dtype for k, v in local_batches[0].items()}

    def rows(batches):
        cols = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
        order = np.argsort(cols["timestamp"])
        return {k: v[order] for k, v in cols.items()}
    got, want = rows(ray_batches), rows(local_batches)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
