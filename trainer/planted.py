"""Planted clusters (synthetic data): load them, install them as a CEL collection's assignment
(the oracle run, `cel.init_from_planted`), and score learned clusters against them (purity and
adjusted Rand index over warm entities, `trainer.metrics.planted_recovery`)."""
from __future__ import annotations

import os

import numpy as np
import torch

from data_pipeline.dataset import load_planted
from trainer.metrics import planted_recovery

ENTITY_OF_TABLE = {"user": "users", "item": "items"}


def load_planted_labels(data_dir: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """Table name (user / item) -> planted cluster of each entity; None when the dataset has no
    planted clusters (real data)."""
    labels = {t: load_planted(data_dir, e, missing_ok=True) for t, e in ENTITY_OF_TABLE.items()}
    return None if all(v is None for v in labels.values()) else labels


def install_planted(collection, planted: dict[str, np.ndarray]) -> None:
    """Set each clustered table's assignment to its planted clusters (relabelled 0..k-1, so no
    active cluster is empty) and num_active to k. Call on the unsharded collection, before
    sharding copies its state."""
    for table in collection.clustered_tables:
        labels = planted.get(table)
        if labels is None:
            raise ValueError(f"cel.init_from_planted: the dataset has no planted clusters for "
                             f"table {table!r}")
        state = collection.cluster_states[table]
        if labels.size != state.num_entities:
            raise ValueError(f"cel.init_from_planted: {labels.size} planted {table} labels for "
                             f"{state.num_entities} entities")
        uniq, dense = np.unique(labels, return_inverse=True)
        if uniq.size > state.capacity:
            raise ValueError(f"cel.init_from_planted: {uniq.size} planted {table} clusters exceed "
                             f"cel.{ENTITY_OF_TABLE[table]}.max_clusters={state.capacity}")
        state.assignment.copy_(torch.from_numpy(dense.reshape(-1)).to(torch.int32))
        state.num_active = int(uniq.size)


def setup_planted(cfg, data_dir: str | os.PathLike, collection) -> dict[str, np.ndarray] | None:
    """The planted labels a CEL run is scored against (None for other runs or real data), after
    installing them as the assignment when `cel.init_from_planted` is set."""
    is_cel = hasattr(collection, "cluster_states")
    planted = load_planted_labels(data_dir) if is_cel else None
    if cfg.cel.init_from_planted:
        if not is_cel:
            raise ValueError("cel.init_from_planted needs embedding.method=cel")
        if planted is None:
            raise ValueError(f"cel.init_from_planted: {data_dir} has no planted clusters "
                             f"(only synthetic datasets do; use data.kind=synthetic)")
        install_planted(collection, planted)
    return planted


def planted_metrics(cel, planted: dict[str, np.ndarray] | None, train_counts: dict[str, object],
                    min_interactions: int = 5) -> dict[str, float]:
    """`purity_<users|items>` and `ari_<users|items>` of every clustered table of `cel` (the
    collection the cluster phases drive) over entities with >= `min_interactions` training
    interactions; {} without CEL or planted labels. `train_counts` is keyed by table."""
    if cel is None or planted is None:
        return {}
    tables = [t for t in cel.clustered_tables if planted.get(t) is not None]
    key = ENTITY_OF_TABLE
    return planted_recovery(
        {key[t]: cel.cluster_states[t].assignment.cpu().numpy() for t in tables},
        {key[t]: planted[t] for t in tables},
        {key[t]: np.asarray(train_counts[t]) for t in tables}, min_interactions=min_interactions)
