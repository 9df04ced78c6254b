"""How Ray Train hands dataset shards to its workers (imported lazily: it imports Ray).

Ray Train's stock `DataConfig` gives every worker a `streaming_split` iterator: a
`SplitCoordinator` actor runs one streaming execution per epoch and deals its blocks to the
workers. For a dataset that is already materialized in the object store (the driver caches small
training splits, see `data_pipeline.ray_data.MATERIALIZE_MAX_BYTES`) there is nothing left to
execute, and the coordinator only costs time: its actor has to start and every epoch opens with
a round of calls to it (~2 s before the first batch on a 2-core machine, `bench/ray_bench.py`).
`ShardMaterializedDataConfig` instead splits each materialized dataset into equal materialized
shards in the driver, right after reading it (`MaterializedDataset.split(equal=True)`: tens of
ms there, against ~3 s when Ray Train's controller did it at the first `get_dataset_shard`,
starting a Ray Data execution of its own), and each worker iterates its own shard's blocks.
Both drop the same `rows % world_size` rows as `streaming_split(equal=True)`. Lazy datasets keep
the stock streaming split.
"""
from __future__ import annotations

from typing import Any

import ray.train
from ray.data.dataset import MaterializedDataset


class ShardMaterializedDataConfig(ray.train.DataConfig):
    """`DataConfig` that gives each worker an equal shard of every materialized dataset it
    splits (pre-split by `presplit` in the driver, else split here), with no split
    coordinator; the stock streaming split for anything else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shards: dict[str, list[MaterializedDataset]] = {}

    def _to_split(self, names) -> set[str]:
        return set(names) if self._datasets_to_split == "all" else set(self._datasets_to_split)

    def presplit(self, datasets: dict[str, Any], world_size: int) -> "ShardMaterializedDataConfig":
        """Split the materialized datasets among `world_size` workers now (in the driver, whose
        Ray Data workers are warm from reading them). Returns self."""
        for name in self._to_split(datasets):
            if isinstance(datasets[name], MaterializedDataset):
                self._shards[name] = datasets[name].split(world_size, equal=True)
        return self

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any,
                  worker_node_ids: Any, **kwargs: Any) -> list[dict[str, Any]]:
        to_split = self._to_split(datasets)
        ready = {name: ds for name, ds in datasets.items()
                 if name in to_split and isinstance(ds, MaterializedDataset)}
        rest = {name: ds for name, ds in datasets.items() if name not in ready}
        output = (super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
                  if rest else [{} for _ in range(world_size)])
        for name, ds in ready.items():
            shards = self._shards.get(name)
            if shards is None or len(shards) != world_size:
                shards = ds.split(world_size, equal=True)
            for rank, shard in enumerate(shards):
                shard.context.execution_options = self._resolve_execution_options(name)
                output[rank][name] = shard.iterator()
        return output
