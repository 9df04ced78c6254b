"""The Ray Data path: a prepared split as a `ray.data.Dataset`, and numpy batches in the same
format (columns, dtypes) as data_pipeline.local. Ray is imported lazily."""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np

from data_pipeline import schema
from data_pipeline.dataset import split_files
from data_pipeline.local import open_parquet


# Training splits up to this many Parquet bytes on disk (a few times more in memory) are read
# once and kept in Ray's object store (`materialize`). A lazy dataset is re-executed every epoch
# (`streaming_split` starts a new execution per epoch): on a 2-core machine that cost 3.5-6.5 s
# of read-task start-up before each epoch's first batch (bench/ray_bench.py), against ~0.1 s
# from the object store.
MATERIALIZE_MAX_BYTES = 128 * 2**20


def read_split(directory: str | os.PathLike, split: str, *, override_num_blocks: int | None = None,
               columns: Sequence[str] | None = None,
               materialize_max_bytes: int | None = None) -> "ray.data.Dataset":
    """DIR/<split> via `ray.data.read_parquet`, after checking every file's schema here (so a
    bad file fails fast with a DataError naming it, not inside a Ray task). With
    `materialize_max_bytes`, a split whose files total at most that many bytes is read now and
    cached in the object store (so later epochs skip the read); larger splits stay streaming."""
    import ray.data
    files = split_files(os.path.join(directory, split))
    for f in files:
        open_parquet(f)
    ds = ray.data.read_parquet([str(f) for f in files], override_num_blocks=override_num_blocks,
                               columns=list(columns) if columns is not None else None)
    if materialize_max_bytes is not None and \
            sum(os.path.getsize(f) for f in files) <= materialize_max_bytes:
        ds = ds.materialize()
    return ds


def iter_numpy_batches(ds_or_shard: Any, batch_size: int, *, local_shuffle_seed: int | None = None,
                       local_shuffle_buffer_size: int | None = None, drop_last: bool = False,
                       validate: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """dict[str, np.ndarray] batches (schema dtypes, contiguous) from a Dataset or a
    DataIterator (`ray.train.get_dataset_shard`). A seed turns on local shuffling."""
    if local_shuffle_seed is not None and local_shuffle_buffer_size is None:
        local_shuffle_buffer_size = max(4 * batch_size, 16_384)
    batches = ds_or_shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                       drop_last=drop_last,
                                       local_shuffle_buffer_size=local_shuffle_buffer_size,
                                       local_shuffle_seed=local_shuffle_seed)
    for batch in batches:
        out = {name: np.ascontiguousarray(values, dtype=schema.numpy_dtype(name))
               for name, values in batch.items()}
        if validate:
            schema.validate_values(out, "ray batch")
        yield out
