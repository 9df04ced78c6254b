"""Where the recipe's batches come from, and how ranks stay in step over them: a rank's
training or evaluation batches as (KJT, dense, label) on its device (local Parquet reader, or
Ray Data shards through the worker context), and the rank-synchronised iterators that keep every
rank's collectives matched when ranks hold different batch counts."""
from __future__ import annotations

import pathlib
from typing import Callable, Iterator

import torch

from data_pipeline.collate import to_kjt
from trainer.dist import DistEnv, all_reduce_


class BatchSource:
    """This rank's training or evaluation batches, as (KJT, dense, label) on the device."""

    def __init__(self, make_iter: Callable[[int], Iterator[dict]], device: torch.device):
        self._make_iter = make_iter
        self._device = device

    def epoch(self, epoch: int) -> Iterator[tuple]:
        for batch in self._make_iter(epoch):
            kjt, dense, label = to_kjt(batch)
            yield (kjt.to(self._device), None if dense is None else dense.to(self._device),
                   label.to(self._device))


def local_source(path: pathlib.Path, batch_size: int, env: DistEnv, shuffle: bool,
                 seed: int, equal_shares: bool = False) -> BatchSource:
    """`equal_shares`: every rank reads the same number of rows (the training split: equal
    batch sizes on every rank, which a sharded table's backward needs)."""
    from data_pipeline.local import ParquetBatchReader
    reader = ParquetBatchReader(str(path), batch_size=batch_size, rank=env.rank,
                                world_size=env.world_size, shuffle=shuffle, seed=seed,
                                equal_shares=equal_shares)

    def make(epoch: int):
        reader.set_epoch(epoch)
        return iter(reader)
    return BatchSource(make, env.device)


def _next_on_all_ranks(it: Iterator[tuple], env: DistEnv, op: str) -> tuple[tuple | None, bool]:
    """This rank's next item (None when it has run out) and whether the ranks go on: with
    `op="min"` only while every rank has an item, with `op="max"` while any rank has one."""
    item = next(it, None)
    have = torch.tensor([0 if item is None else 1])
    all_reduce_(have, env, op=op)
    return item, int(have) != 0


def synchronised(batches: Iterator[tuple], env: DistEnv) -> Iterator[tuple]:
    """Stop every rank as soon as one rank runs out of batches (equal step counts keep the
    collectives of sharded training and cluster phases aligned)."""
    if not env.distributed:
        yield from batches
        return
    it = iter(batches)
    while True:
        item, go_on = _next_on_all_ranks(it, env, "min")
        if not go_on:
            return
        yield item


def padded(batches: Iterator[tuple], env: DistEnv) -> Iterator[tuple]:
    """(kjt, dense, label, valid) until every rank is done: a rank that runs out repeats its
    last batch with valid=False, so the sharded lookups' collectives stay matched and every
    row is still read exactly once."""
    if not env.distributed:
        for item in batches:
            yield (*item, True)
        return
    it, last = iter(batches), None
    while True:
        item, go_on = _next_on_all_ranks(it, env, "max")
        if not go_on:
            return
        if item is None:
            if last is None:
                raise RuntimeError(f"rank {env.rank} has no evaluation data to pad with")
            yield (*last, False)
        else:
            last = item
            yield (*item, True)
