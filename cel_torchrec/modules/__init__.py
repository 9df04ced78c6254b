"""Unsharded embedding modules: the CEL collection (the test oracle for sharding) and baselines."""
from cel_torchrec.modules.baselines import (FullEmbeddingBagCollection, HashedEmbeddingBagCollection,
                                            QREmbeddingBagCollection, hash_ids)
from cel_torchrec.modules.clustered_ebc import (ClusteredEmbeddingBagCollection, ClusteringConfig,
                                                ClusterRemapper)

__all__ = ["ClusteredEmbeddingBagCollection", "ClusteringConfig", "ClusterRemapper",
           "FullEmbeddingBagCollection", "HashedEmbeddingBagCollection", "QREmbeddingBagCollection",
           "hash_ids"]
