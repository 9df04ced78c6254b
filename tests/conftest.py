"""Helpers shared by the module, trainer and distributed tests: the two-table (user, item)
configs and one-id-per-sample KJTs they build. Imported lazily (torchrec loads only when a test
uses them), and importable from spawned worker processes (`from tests.conftest import ...`)."""
from __future__ import annotations

import torch


def user_item_tables(users: int, items: int, dim: int) -> list:
    """EmbeddingBagConfigs `user` (feature `user_id`) and `item` (feature `item_id`)."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    return [EmbeddingBagConfig(name="user", embedding_dim=dim, num_embeddings=users, feature_names=["user_id"]),
            EmbeddingBagConfig(name="item", embedding_dim=dim, num_embeddings=items, feature_names=["item_id"])]


def user_item_kjt(users, items):
    """A KJT with one user id and one item id per sample (lists or tensors)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    users, items = torch.as_tensor(users), torch.as_tensor(items)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id"], values=torch.cat([users, items]),
        lengths=torch.ones(users.numel() + items.numel(), dtype=torch.long))


def scatter_clusters(emb, table: str, clusters: int, entities: int | None = None) -> None:
    """Put `table`'s entities of CEL collection `emb` into `clusters` random clusters, none
    empty (entity c starts cluster c), and give every parameter of `emb` random values."""
    st = emb.cluster_states[table]
    n = st.num_entities if entities is None else entities
    st.assignment[:n].copy_(torch.randint(0, clusters, (n,), dtype=torch.int32))
    st.assignment[:clusters] = torch.arange(clusters, dtype=torch.int32)
    st.num_active = clusters
    with torch.no_grad():
        for p in emb.parameters():
            p.normal_()
