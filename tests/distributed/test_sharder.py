"""The CEL sharder's contract with TorchRec's planner (no process group needed)."""
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cel_torchrec.distributed import (ClusteredEmbeddingBagCollectionSharder,
                                      ShardedClusteredEmbeddingBagCollection, cel_sharders)
from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig


def test_sharder_composes_the_stock_sharder_and_allows_row_wise_on_cpu():
    sharder = ClusteredEmbeddingBagCollectionSharder(fused_params={"learning_rate": 0.1})
    assert sharder.module_type is ClusteredEmbeddingBagCollection
    assert sharder.sharded_module_type is ShardedClusteredEmbeddingBagCollection
    cpu = set(sharder.sharding_types("cpu"))
    assert {ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value,
            ShardingType.ROW_WISE.value, ShardingType.DATA_PARALLEL.value} <= cpu
    assert sharder.fused_params == {"learning_rate": 0.1}
    m = ClusteredEmbeddingBagCollection(
        [EmbeddingBagConfig(name="item", embedding_dim=4, num_embeddings=100, feature_names=["item_id"])],
        {"item": ClusteringConfig(max_clusters=7)})
    params = sharder.shardable_parameters(m)
    assert set(params) == {"item"} and params["item"].shape == (7, 4)   # cluster rows, not entities
    kinds = [type(s) for s in cel_sharders()]
    assert kinds[0] is ClusteredEmbeddingBagCollectionSharder
    assert sum(issubclass(k, EmbeddingBagCollectionSharder) for k in kinds) == 1


def test_fused_params_map_torch_optimizers_to_fbgemm_with_torch_defaults():
    import pytest
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    from cel_torchrec.distributed import fused_params
    assert fused_params("adagrad", 0.05) == {"optimizer": EmbOptimType.EXACT_ADAGRAD,
                                             "learning_rate": 0.05, "eps": 1e-10}
    assert fused_params("sgd", 0.1) == {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}
    assert fused_params("adam", 0.01)["optimizer"] == EmbOptimType.ADAM
    with pytest.raises(ValueError, match="no fused FBGEMM optimizer for 'rmsprop'"):
        fused_params("rmsprop", 0.1)
