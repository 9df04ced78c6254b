"""What a run is built from, chosen by its config: the dataset directory and the entity
embedding collection (`embedding.method`: cel | full | hash | qr | sparse | cce | cerp),
initialised. The recipe
(`trainer.loop`) calls these once in `setup`."""
from __future__ import annotations

import dataclasses
import pathlib

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cel_torchrec.modules import (ClusteredEmbeddingBagCollection, ClusteringConfig,
                                  FullEmbeddingBagCollection, HashedEmbeddingBagCollection,
                                  QREmbeddingBagCollection)
from cel_torchrec.modules.compact import (CCEEmbeddingBagCollection, CCEShape,
                                          CERPEmbeddingBagCollection, CERPShape,
                                          SparseEmbeddingBagCollection, cce_shape_for,
                                          cerp_shape_for, qr_collisions_for, sparse_k_for)
from trainer.config import TrainConfig
from trainer.dist import DistEnv, barrier
from trainer.models import CTR_MODELS, embedding_dim_for

CONFIG_KEY_OF_TABLE = {"user": "users", "item": "items"}
COMPACT_METHODS = ("sparse", "cce", "cerp")
METHODS = ("cel", "full", "hash", "qr", *COMPACT_METHODS)


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
    if cfg.data.kind == "synthetic":
        from data_pipeline.synthetic import ensure_synthetic as ensure
        params = dataclasses.asdict(cfg.data.synthetic)
    elif cfg.data.kind == "synthetic_ctr":
        from data_pipeline.synthetic_ctr import ensure_synthetic_ctr as ensure
        params = dataclasses.asdict(cfg.data.synthetic_ctr)
    else:
        raise ValueError(f"data.kind must be synthetic|synthetic_ctr|path, got {cfg.data.kind!r}")
    if env.is_main:
        path = ensure(cfg.data.cache_dir, **params)
    barrier(env)
    if not env.is_main:
        path = ensure(cfg.data.cache_dir, **params)   # cached: just resolves the path
    return pathlib.Path(path)


def table_specs(cfg: TrainConfig, num_users: int, num_items: int,
                sparse_features: dict[str, int] | None = None) -> list[tuple[str, str, int]]:
    """(table, feature, rows) of every embedding table: `user` and `item`, and for a CTR model
    (`trainer.models.CTR_MODELS`) one table per extra categorical feature, named as it."""
    specs = [("user", "user_id", num_users), ("item", "item_id", num_items)]
    if cfg.model.name in CTR_MODELS:
        specs += [(name, name, int(rows)) for name, rows in (sparse_features or {}).items()]
    return specs


def build_embedding_collection(cfg: TrainConfig, num_users: int, num_items: int,
                               device: torch.device,
                               sparse_features: dict[str, int] | None = None) -> torch.nn.Module:
    """The entity embedding collection chosen by `embedding.method` (cel | full | hash | qr |
    sparse | cce | cerp) over the tables of `table_specs`, sized by `embedding.compression`
    when it is set (sparse, cce and cerp are sized by it only)."""
    dim = embedding_dim_for(cfg.model)
    specs = table_specs(cfg, num_users, num_items, sparse_features)
    tables = [EmbeddingBagConfig(name=t, embedding_dim=dim, num_embeddings=n, feature_names=[f])
              for t, f, n in specs]
    method = cfg.embedding.method
    budget = compressed_rows(cfg, specs, dim) if cfg.embedding.compression else None
    if method == "cel":
        clustering = {}
        if budget is not None:
            template = library_clustering(cfg.cel.items, None)
            clustering = {t: dataclasses.replace(template, max_clusters=rows,
                                                 init_clusters=min(template.init_clusters, rows))
                          for t, rows in budget.items()}
        else:
            for table, key in CONFIG_KEY_OF_TABLE.items():
                c = getattr(cfg.cel, key)
                if c.enabled:
                    clustering[table] = library_clustering(c, _entity_bias_column(cfg, c))
        emb = ClusteredEmbeddingBagCollection(tables, clustering, device=device, seed=cfg.train.seed)
    elif method == "full":
        emb = FullEmbeddingBagCollection(tables=tables, device=device)
    elif method == "hash":
        emb = HashedEmbeddingBagCollection(
            tables, budget if budget is not None else _per_table(cfg.embedding.hash_buckets, specs),
            device=device)
    elif method == "qr":
        emb = QREmbeddingBagCollection(
            tables, budget if budget is not None else _per_table(cfg.embedding.qr_collisions, specs),
            device=device)
    elif method in COMPACT_METHODS:
        if budget is None:
            raise ValueError(f"embedding.method={method} is sized by embedding.compression "
                             f"(full bytes / method bytes); set it, e.g. embedding.compression=16")
        e = cfg.embedding
        if method == "sparse":
            emb = SparseEmbeddingBagCollection(tables, budget, device=device)
        elif method == "cce":
            emb = CCEEmbeddingBagCollection(tables, budget, until=e.cce_until, seed=cfg.train.seed,
                                            device=device)
        else:
            emb = CERPEmbeddingBagCollection(tables, budget, reg=e.cerp_reg, device=device)
    else:
        raise ValueError(f"embedding.method must be {'|'.join(METHODS)}, got {method!r}")
    # MF / DeepFM: the bias column d (and FBGEMM alignment padding after it) starts at zero
    _init_embeddings(emb, cfg.model.init_std, seed=cfg.train.seed,
                     zero_from=cfg.model.embedding_dim if cfg.model.name in ("mf", "deepfm") else None)
    if hasattr(emb, "after_init"):
        emb.after_init()
    return emb


def cel_clusters_for(n: int, row_bytes: int, ratio: float, map_dtype: str = "int32") -> int:
    """The most CEL cluster rows (at most `n`) whose rows plus assignment map take at most
    `n * row_bytes / ratio` bytes; 0 if none fit. `map_dtype=auto`: the map is as narrow as the
    cluster count allows (int8 up to 128 clusters, int16 up to 32,768), the widest count wins."""
    widths = [(1, 128), (2, 32768), (4, n)] if map_dtype == "auto" else [(4, n)]
    best = 0
    for width, most in widths:
        rows = min(int((n * row_bytes / ratio - width * n) // row_bytes), most, n)
        best = max(best, rows)
    return max(best, 0)


def compressed_rows(cfg: TrainConfig, specs: list[tuple[str, str, int]], dim: int) -> dict:
    """`embedding.compression`: per table with at least `embedding.min_cardinality` rows, the
    size that brings its bytes to about `full / compression` under `embedding.method` (the
    total byte budget split in proportion to cardinality): CEL clusters after its assignment map
    (`cel.items.map_dtype`: int32, or as narrow as the clusters allow),
    hash buckets, QR's collision count `m` (a quotient table of `ceil(n / m)` rows plus a
    remainder table of `m`), sparse's non-zeros per row, CCE's `CCEShape` or CERP's
    `CERPShape` (`cel_torchrec.modules.compact`). Smaller tables are left out (full)."""
    e = cfg.embedding
    ratio = float(e.compression)
    if ratio <= 1:
        raise ValueError(f"embedding.compression must be > 1 (full bytes / method bytes), got {ratio}")
    row_bytes = dim * 4
    out = {}
    for table, _, n in specs:
        if n < e.min_cardinality:
            continue
        budget_rows = n / ratio                       # full rows / ratio
        if e.method == "cel":
            maps = cfg.cel.items.map_dtype
            rows = cel_clusters_for(n, row_bytes, ratio, maps)
            if rows < 1:
                width = "an int8" if maps == "auto" else "an int32"
                raise ValueError(f"embedding.compression={ratio:g} is out of CEL's reach for "
                                 f"table {table!r}: {width} assignment map alone is "
                                 f"1/{dim * (4 if maps == 'auto' else 1)} of the full table's "
                                 f"bytes")
            out[table] = rows
        elif e.method == "hash":
            out[table] = max(1, min(n, int(budget_rows)))
        elif e.method == "qr":
            out[table] = qr_collisions_for(n, budget_rows)
        elif e.method == "sparse":
            out[table] = sparse_k_for(dim, ratio)
        elif e.method == "cce":
            out[table] = CCEShape(*cce_shape_for(n, dim, ratio, e.cce_chunks))
        elif e.method == "cerp":
            out[table] = CERPShape(*cerp_shape_for(n, dim, ratio, e.cerp_dense_factor))
        elif e.method != "full":
            raise ValueError(f"embedding.method must be {'|'.join(METHODS)}, got {e.method!r}")
    return out


def library_clustering(c: ClusteringConfig, entity_bias_column: int | None) -> ClusteringConfig:
    """The library's ClusteringConfig of a `cel.<table>` section (a subclass of it that adds the
    trainer's `enabled` and `entity_bias`): the library's fields, with the bias column that the
    trainer's `entity_bias` switch becomes."""
    fields = {f.name: getattr(c, f.name) for f in dataclasses.fields(ClusteringConfig)}
    return ClusteringConfig(**{**fields, "entity_bias_column": entity_bias_column})


def _entity_bias_column(cfg: TrainConfig, c) -> int | None:
    """MF's bias column d for `cel.<table>.entity_bias` (other models have no bias column)."""
    if not c.entity_bias:
        return None
    if cfg.model.name != "mf":
        raise ValueError("cel.<table>.entity_bias needs model.name=mf (the bias column)")
    return cfg.model.embedding_dim


def _per_table(by_key: dict[str, int], specs: list[tuple[str, str, int]]) -> dict[str, int]:
    """Config dicts are keyed by table (users/items or user/item, or a CTR feature's name)."""
    names = [t for t, _, _ in specs]
    out = {}
    for k, v in by_key.items():
        table = {"users": "user", "items": "item"}.get(k, k)
        if table not in names:
            raise ValueError(f"unknown table {k!r}: use users, items or one of {names[2:]}")
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
