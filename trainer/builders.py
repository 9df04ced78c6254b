"""What a run is built from, chosen by its config: the dataset directory and the entity
embedding collection (`embedding.method`: cel | full | hash | qr), initialised. The recipe
(`trainer.loop`) calls these once in `setup`."""
from __future__ import annotations

import dataclasses
import pathlib

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cel_torchrec.modules import (ClusteredEmbeddingBagCollection, ClusteringConfig,
                                  FullEmbeddingBagCollection, HashedEmbeddingBagCollection,
                                  QREmbeddingBagCollection)
from trainer.config import TrainConfig
from trainer.dist import DistEnv, barrier
from trainer.models import embedding_dim_for

CONFIG_KEY_OF_TABLE = {"user": "users", "item": "items"}


def resolve_dataset(cfg: TrainConfig, env: DistEnv) -> pathlib.Path:
    """The prepared dataset directory; the synthetic one is built once (rank 0) and cached."""
    if cfg.data.kind == "path":
        if not cfg.data.path:
            raise ValueError("data.kind=path needs data.path (a prepared dataset directory)")
        path = pathlib.Path(cfg.data.path)
        if not (path / "meta.json").exists():
            raise FileNotFoundError(f"{path}: not a prepared dataset (no meta.json); run "
                                    f"`python -m data_pipeline prepare ...` first")
        return path
    if cfg.data.kind != "synthetic":
        raise ValueError(f"data.kind must be synthetic|path, got {cfg.data.kind!r}")
    from data_pipeline.synthetic import ensure_synthetic
    s = cfg.data.synthetic
    params = dict(users=s.users, items=s.items, interactions=s.interactions, clusters=s.clusters,
                  seed=s.seed, label=s.label)
    if env.is_main:
        path = ensure_synthetic(cfg.data.cache_dir, **params)
    barrier(env)
    if not env.is_main:
        path = ensure_synthetic(cfg.data.cache_dir, **params)   # cached: just resolves the path
    return pathlib.Path(path)


def build_embedding_collection(cfg: TrainConfig, num_users: int, num_items: int,
                               device: torch.device) -> torch.nn.Module:
    """The entity embedding collection chosen by `embedding.method` (cel | full | hash | qr)."""
    dim = embedding_dim_for(cfg.model)
    tables = [EmbeddingBagConfig(name="user", embedding_dim=dim, num_embeddings=num_users,
                                 feature_names=["user_id"]),
              EmbeddingBagConfig(name="item", embedding_dim=dim, num_embeddings=num_items,
                                 feature_names=["item_id"])]
    method = cfg.embedding.method
    if method == "cel":
        clustering = {}
        for table, key in CONFIG_KEY_OF_TABLE.items():
            c = getattr(cfg.cel, key)
            if c.enabled:
                clustering[table] = library_clustering(c, _entity_bias_column(cfg, c))
        emb = ClusteredEmbeddingBagCollection(tables, clustering, device=device, seed=cfg.train.seed)
    elif method == "full":
        emb = FullEmbeddingBagCollection(tables=tables, device=device)
    elif method == "hash":
        emb = HashedEmbeddingBagCollection(tables, _per_table(cfg.embedding.hash_buckets), device=device)
    elif method == "qr":
        emb = QREmbeddingBagCollection(tables, _per_table(cfg.embedding.qr_collisions), device=device)
    else:
        raise ValueError(f"embedding.method must be cel|full|hash|qr, got {method!r}")
    # MF: bias column d (and FBGEMM alignment padding after it) starts at zero
    _init_embeddings(emb, cfg.model.init_std, seed=cfg.train.seed,
                     zero_from=cfg.model.embedding_dim if cfg.model.name == "mf" else None)
    return emb


def library_clustering(c, entity_bias_column: int | None) -> ClusteringConfig:
    """The library's ClusteringConfig from a `cel.<table>` section: every field of the library's
    class is declared, same name and meaning, in the trainer's (a test keeps them in step); the
    trainer's `entity_bias` switch becomes the library's bias column."""
    shared = {f.name for f in dataclasses.fields(ClusteringConfig)} - {"entity_bias_column"}
    return ClusteringConfig(**{name: getattr(c, name) for name in shared},
                            entity_bias_column=entity_bias_column)


def _entity_bias_column(cfg: TrainConfig, c) -> int | None:
    """MF's bias column d for `cel.<table>.entity_bias` (other models have no bias column)."""
    if not c.entity_bias:
        return None
    if cfg.model.name != "mf":
        raise ValueError("cel.<table>.entity_bias needs model.name=mf (the bias column)")
    return cfg.model.embedding_dim


def _per_table(by_key: dict[str, int]) -> dict[str, int]:
    """Config dicts are keyed users/items (or user/item); tables are named user/item."""
    out = {}
    for k, v in by_key.items():
        table = {"users": "user", "items": "item"}.get(k, k)
        if table not in ("user", "item"):
            raise ValueError(f"unknown table {k!r}: use users or items")
        out[table] = int(v)
    return out


@torch.no_grad()
def _init_embeddings(emb: torch.nn.Module, std: float, seed: int, zero_from: int | None) -> None:
    """N(0, std) rows (deterministic by seed); columns from `zero_from` on start at zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(emb.named_parameters()):
        p.copy_(torch.randn(p.shape, generator=g) * std)
        if zero_from is not None and p.dim() == 2 and "__q" not in name and "__r" not in name:
            p[:, zero_from:] = 0.0
        if zero_from is not None and p.dim() == 1:   # MF: per-entity biases start at zero
            p.zero_()
