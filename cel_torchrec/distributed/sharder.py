"""ClusteredEmbeddingBagCollectionSharder: composes TorchRec's stock EmbeddingBagCollectionSharder
for the cluster table (as `ManagedCollisionEmbeddingBagCollectionSharder` does for managed
collision), so every stock sharding type, kernel and fused optimizer applies to it."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.distributed.embedding_types import BaseEmbeddingSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ParameterSharding, QuantizedCommCodecs, ShardingEnv, ShardingType

from cel_torchrec.distributed.sharded_clustered_ebc import ShardedClusteredEmbeddingBagCollection
from cel_torchrec.modules.clustered_ebc import ClusteredEmbeddingBagCollection


class RowWiseOnCPUEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """The stock EBC sharder, plus `row_wise` on CPU (stock TorchRec offers it on CUDA only).
    Row-wise pooled lookups with a fused optimizer run forward and backward on gloo; the
    distributed tests prove it against the unsharded oracle."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types


class ClusteredEmbeddingBagCollectionSharder(BaseEmbeddingSharder[ClusteredEmbeddingBagCollection]):
    """Shards a `ClusteredEmbeddingBagCollection`: the cluster tables by the composed stock
    sharder (table_wise, column_wise, row_wise, table_column_wise, data_parallel), the assignment
    maps replicated. Pass it explicitly to the planner and `DistributedModelParallel`:
    `sharders=[ClusteredEmbeddingBagCollectionSharder(fused_params=...), *get_default_sharders()]`.

    `batch_scope`: how `grad_average="batch"` counts distinct members (see
    `ShardedClusteredEmbeddingBagCollection`)."""

    def __init__(self, ebc_sharder: EmbeddingBagCollectionSharder | None = None,
                 fused_params: dict[str, Any] | None = None,
                 qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
                 batch_scope: str = "global") -> None:
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        self._ebc_sharder = ebc_sharder or RowWiseOnCPUEmbeddingBagCollectionSharder(
            fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        self._batch_scope = batch_scope

    def shard(self, module: ClusteredEmbeddingBagCollection, params: dict[str, ParameterSharding],
              env: ShardingEnv, device: torch.device | None = None,
              module_fqn: str | None = None) -> ShardedClusteredEmbeddingBagCollection:
        return ShardedClusteredEmbeddingBagCollection(
            module, params, ebc_sharder=self._ebc_sharder, env=env,
            device=device if device is not None else torch.device("cpu"),
            batch_scope=self._batch_scope, module_fqn=module_fqn)

    def shardable_parameters(self, module: ClusteredEmbeddingBagCollection) -> dict[str, nn.Parameter]:
        return self._ebc_sharder.shardable_parameters(module._embedding_bag_collection)

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return self._ebc_sharder.sharding_types(compute_device_type)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return self._ebc_sharder.compute_kernels(sharding_type, compute_device_type)

    @property
    def fused_params(self) -> dict[str, Any] | None:
        return self._ebc_sharder.fused_params

    @property
    def module_type(self) -> type[ClusteredEmbeddingBagCollection]:
        return ClusteredEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> type[ShardedClusteredEmbeddingBagCollection]:
        return ShardedClusteredEmbeddingBagCollection
