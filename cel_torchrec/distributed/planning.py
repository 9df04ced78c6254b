"""One call to shard a model that contains CEL (and plain) embedding bag collections:
TorchRec's planner with per-table sharding constraints, then `DistributedModelParallel`."""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from cel_torchrec.choices import SHARDING_TYPES
from cel_torchrec.distributed.sharded_clustered_ebc import ShardedClusteredEmbeddingBagCollection
from cel_torchrec.distributed.sharder import (ClusteredEmbeddingBagCollectionSharder,
                                              RowWiseOnCPUEmbeddingBagCollectionSharder)
from cel_torchrec.modules.clustered_ebc import ClusteredEmbeddingBagCollection


def cel_sharders(fused_params: dict[str, Any] | None = None,
                 batch_scope: str = "global") -> list[ModuleSharder[nn.Module]]:
    """The CEL sharder, an EBC sharder with the same fused optimizer (row-wise allowed on CPU),
    then TorchRec's other default sharders."""
    ebc = RowWiseOnCPUEmbeddingBagCollectionSharder(fused_params=fused_params)
    rest = [s for s in get_default_sharders() if not isinstance(s, EmbeddingBagCollectionSharder)]
    return [ClusteredEmbeddingBagCollectionSharder(ebc_sharder=ebc, batch_scope=batch_scope),
            ebc, *rest]


def _embedding_tables(module: nn.Module) -> Iterator[tuple[str, int]]:
    """(table name, embedding dim) of every CEL / EBC table in `module`."""
    for m in module.modules():
        if isinstance(m, ClusteredEmbeddingBagCollection):
            yield from ((t.name, t.embedding_dim) for t in m.embedding_bag_configs())
        elif isinstance(m, EmbeddingBagCollection) and not any(
                m is c._embedding_bag_collection for c in module.modules()
                if isinstance(c, ClusteredEmbeddingBagCollection)):
            yield from ((t.name, t.embedding_dim) for t in m.embedding_bag_configs())


def sharding_constraints(module: nn.Module, sharding_type: str | dict[str, str],
                         world_size: int) -> dict[str, ParameterConstraints]:
    """Planner constraints that force one sharding type per table (`sharding_type` may be a
    table -> type dict); column-wise tables are cut into `world_size` column shards."""
    out = {}
    for name, dim in _embedding_tables(module):
        kind = sharding_type[name] if isinstance(sharding_type, dict) else sharding_type
        if kind not in SHARDING_TYPES:
            raise ValueError(f"sharding type must be one of {SHARDING_TYPES}, got {kind!r}")
        kernel = (EmbeddingComputeKernel.DENSE if kind == ShardingType.DATA_PARALLEL.value
                  else EmbeddingComputeKernel.FUSED)
        kwargs = {}
        if kind in ("column_wise", "table_column_wise") and dim % world_size == 0:
            kwargs["min_partition"] = dim // world_size
        out[name] = ParameterConstraints(sharding_types=[kind], compute_kernels=[kernel.value], **kwargs)
    return out


def shard_model(module: nn.Module, *, sharding_type: str | dict[str, str] = "table_wise",
                fused_params: dict[str, Any] | None = None,
                process_group: dist.ProcessGroup | None = None,
                device: torch.device | None = None, batch_scope: str = "global",
                init_data_parallel: bool = True) -> DistributedModelParallel:
    """Plan with TorchRec's planner (one sharding type per table) and wrap `module` in
    `DistributedModelParallel` with the CEL sharder. Collective: call on every rank with the
    same module structure. `fused_params` e.g. `{"optimizer": EmbOptimType.EXACT_SGD,
    "learning_rate": 0.1}`."""
    pg = process_group or dist.GroupMember.WORLD
    world = dist.get_world_size(pg)
    device = device or torch.device("cpu")
    sharders = cel_sharders(fused_params, batch_scope)
    topology = Topology(world_size=world, compute_device=device.type,
                        local_world_size=world)
    planner = EmbeddingShardingPlanner(topology=topology,
                                       constraints=sharding_constraints(module, sharding_type, world))
    plan = planner.collective_plan(module, sharders, pg)
    return DistributedModelParallel(module, env=ShardingEnv.from_process_group(pg), device=device,
                                    plan=plan, sharders=sharders,
                                    init_data_parallel=init_data_parallel)


def clustered_modules(model: nn.Module) -> dict[str, ShardedClusteredEmbeddingBagCollection]:
    """FQN -> every sharded CEL collection inside a (DMP-wrapped) model, to drive its phases."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, ShardedClusteredEmbeddingBagCollection)}
