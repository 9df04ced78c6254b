"""The local pyarrow reader: numpy batches of one split, sharded by rank, for torchrun and tests.

Sharding unit: a contiguous row range of a per-epoch order of row groups. Every epoch the
split's row groups (across all its files) are put in an order (a seeded permutation of
(seed, epoch) when shuffling, file order otherwise); concatenated, they form a sequence of N
rows of which rank r takes rows [r*N // W, (r+1)*N // W). So every row is read exactly once per
epoch across ranks, rank sizes differ by at most one row, a rank reads whole row groups except
at most two boundary groups that it slices, and datasets with fewer row groups than ranks need
no special case. Within a rank, rows are shuffled through a buffer of `shuffle_buffer_rows`
(seeded by seed, epoch, rank). All of this depends on Parquet metadata only, so every rank
computes every rank's batch count (`num_batches_for_rank`) without communication.
"""
from __future__ import annotations

import math
import os
import pathlib
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import schema
from data_pipeline.dataset import split_files
from data_pipeline.errors import DataError

Batch = dict[str, np.ndarray]


def open_parquet(path: pathlib.Path) -> pq.ParquetFile:
    """A ParquetFile whose schema follows data_pipeline.schema; errors name the file."""
    try:
        parquet_file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise DataError(f"{path}: unreadable Parquet file ({exc})") from None
    schema.validate_schema(parquet_file.schema_arrow, str(path))
    return parquet_file


class ParquetBatchReader:
    """Batches (dict of column -> numpy array, schema dtypes) of one split directory for one
    rank; see the module docstring for how rows are sharded and shuffled."""

    def __init__(self, path: str | os.PathLike, batch_size: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, columns: Sequence[str] | None = None,
                 shuffle_buffer_rows: int = 1 << 18, validate: bool = True,
                 equal_shares: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.path = pathlib.Path(path)
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.shuffle_buffer_rows = int(shuffle_buffer_rows)
        self.validate = validate
        # every rank the same number of rows (num_rows // world_size; the last < world_size rows
        # of the epoch's order are left out), so ranks' batches have equal sizes: a sharded
        # table's backward collectives (gloo all-gather) need them equal
        self.equal_shares = bool(equal_shares)
        self.epoch = 0
        self.files = split_files(self.path)
        self._parquet = [open_parquet(f) for f in self.files]
        names = self._parquet[0].schema_arrow.names
        for f, pf in zip(self.files, self._parquet):
            if pf.schema_arrow.names != names:
                raise DataError(f"{f}: columns {pf.schema_arrow.names} differ from "
                                f"{self.files[0]}'s {names}")
        if columns is not None:
            missing = [c for c in columns if c not in names]
            if missing:
                raise DataError(f"{self.path}: missing column '{missing[0]}' (columns: {names})")
        self.columns = list(columns) if columns is not None else list(names)
        units = []                                   # (file index, row group, first row in file, rows)
        for fi, pf in enumerate(self._parquet):
            first = 0
            for g in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(g).num_rows
                if rows:
                    units.append((fi, g, first, rows))
                first += rows
        self._units = np.array(units, dtype=np.int64).reshape(-1, 4)
        self.num_rows = int(self._units[:, 3].sum()) if len(units) else 0

    # -------------------------------------------------------------- sizes, no communication
    def _bounds(self, rank: int) -> tuple[int, int]:
        if self.equal_shares:
            share = self.num_rows // self.world_size
            return rank * share, (rank + 1) * share
        return rank * self.num_rows // self.world_size, (rank + 1) * self.num_rows // self.world_size

    def rows_for_rank(self, rank: int) -> int:
        lo, hi = self._bounds(rank)
        return hi - lo

    def num_batches_for_rank(self, rank: int) -> int:
        """Batches `rank` yields per epoch (the same on every rank and every epoch)."""
        rows = self.rows_for_rank(rank)
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches_for_rank(self.rank)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically for (seed, epoch)."""
        self.epoch = int(epoch)

    # -------------------------------------------------------------- the plan of one epoch
    def plan(self, rank: int | None = None) -> list[tuple[int, int, int, int]]:
        """(unit index, first row in unit, stop row in unit, first row of the unit in its file)
        segments that `rank` reads this epoch, in reading order."""
        rank = self.rank if rank is None else rank
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self._units))
        else:
            order = np.arange(len(self._units))
        sizes = self._units[order, 3]
        ends = np.cumsum(sizes)
        starts = ends - sizes
        lo, hi = self._bounds(rank)
        segments = []
        for k in np.flatnonzero((ends > lo) & (starts < hi)):
            a, b = max(lo, starts[k]) - starts[k], min(hi, ends[k]) - starts[k]
            segments.append((int(order[k]), int(a), int(b), int(self._units[order[k], 2])))
        return segments

    # -------------------------------------------------------------- iteration
    def _read(self, unit: int, start: int, stop: int, file_row: int) -> Batch:
        fi, group = int(self._units[unit, 0]), int(self._units[unit, 1])
        try:
            table = self._parquet[fi].read_row_group(group, columns=self.columns)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
            raise DataError(f"{self.files[fi]}: row group {group} unreadable ({exc})") from None
        table = table.slice(start, stop - start)
        try:
            columns = schema.table_to_numpy(table)
        except DataError as exc:
            raise DataError(f"{self.files[fi]}: {exc}") from None
        if self.validate:
            schema.validate_values(columns, str(self.files[fi]), row_offset=file_row + start)
        return columns

    def __iter__(self) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 1])
        target = max(self.shuffle_buffer_rows, self.batch_size)
        pending: list[Batch] = []
        pending_rows = 0
        segments = self.plan()
        for i, (unit, start, stop, file_row) in enumerate(segments):
            pending.append(self._read(unit, start, stop, file_row))
            pending_rows += stop - start
            last = i == len(segments) - 1
            if pending_rows < target and not last:
                continue
            buffer = {c: np.concatenate([p[c] for p in pending]) for c in self.columns}
            if self.shuffle:
                perm = rng.permutation(pending_rows)
                buffer = {c: v[perm] for c, v in buffer.items()}
            full = pending_rows - pending_rows % self.batch_size
            for s in range(0, full, self.batch_size):
                yield {c: v[s:s + self.batch_size] for c, v in buffer.items()}
            rest = pending_rows - full
            pending = [{c: v[full:] for c, v in buffer.items()}] if rest else []
            pending_rows = rest
        if pending_rows and not self.drop_last:
            yield {c: np.concatenate([p[c] for p in pending]) for c in self.columns}
