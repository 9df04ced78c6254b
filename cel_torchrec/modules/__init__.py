"""Unsharded embedding modules: the CEL collection (the test oracle for sharding) and baselines.
`ClusteringConfig` lives in the torch-free `cel_torchrec.config`; it is re-exported here."""
from cel_torchrec.modules.baselines import (FullEmbeddingBagCollection, HashedEmbeddingBagCollection,
                                            QREmbeddingBagCollection, hash_ids)
from cel_torchrec.config import ClusteringConfig
from cel_torchrec.modules.clustered_ebc import ClusteredEmbeddingBagCollection, ClusterRemapper

__all__ = ["ClusteredEmbeddingBagCollection", "ClusteringConfig", "ClusterRemapper",
           "FullEmbeddingBagCollection", "HashedEmbeddingBagCollection", "QREmbeddingBagCollection",
           "hash_ids"]
