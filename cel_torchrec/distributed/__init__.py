"""Sharded CEL on TorchRec: the sharder, the sharded collection, cluster phases as collectives,
planning helpers and checkpoints. The only package that knows about process groups."""
from cel_torchrec.distributed.checkpoint import (export_unsharded_state, load_checkpoint,
                                                 load_unsharded_state, save_checkpoint)
from cel_torchrec.distributed.fused import FUSED_KINDS, TORCH_DEFAULTS, TORCH_NAMES, fused_params
from cel_torchrec.distributed.planning import (cel_sharders, clustered_modules, shard_model,
                                               sharding_constraints)
from cel_torchrec.distributed.sharded_clustered_ebc import ShardedClusteredEmbeddingBagCollection
from cel_torchrec.distributed.sharder import (ClusteredEmbeddingBagCollectionSharder,
                                              RowWiseOnCPUEmbeddingBagCollectionSharder)

__all__ = [
    "ClusteredEmbeddingBagCollectionSharder", "RowWiseOnCPUEmbeddingBagCollectionSharder",
    "ShardedClusteredEmbeddingBagCollection", "shard_model", "cel_sharders", "sharding_constraints",
    "clustered_modules", "save_checkpoint", "load_checkpoint", "export_unsharded_state",
    "load_unsharded_state", "fused_params", "FUSED_KINDS", "TORCH_DEFAULTS", "TORCH_NAMES",
]
