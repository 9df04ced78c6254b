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


def _train_chunks(data_dir: str | os.PathLike, rows: int = 1 << 20):
    """(user, item, label) numpy chunks of the training split, at most `rows` each."""
    from data_pipeline import schema
    from data_pipeline.dataset import split_dir, split_files
    from data_pipeline.local import open_parquet
    for path in split_files(split_dir(data_dir, "train")):
        for batch in open_parquet(path).iter_batches(batch_size=rows,
                                                     columns=[schema.USER, schema.ITEM, schema.LABEL]):
            yield (batch.column(0).to_numpy().astype(np.int64),
                   batch.column(1).to_numpy().astype(np.int64),
                   batch.column(2).to_numpy().astype(np.float64))


def planted_map_reference(data_dir: str | os.PathLike, min_interactions: int = 5,
                          entity_chunk: int = 1 << 16) -> dict[str, float]:
    """How well the training data identifies the planted clusters, whatever the learner: each
    entity's maximum-likelihood planted cluster under Gaussian noise, given the other side's
    planted clusters and the planted cluster rows (the block means `B[a, b]`, the mean label of
    (user cluster a, item cluster b) training pairs, i.e. every rating model's best prediction
    from the planted structure alone) is `argmin_k sum_j (y_j - B[k, planted(other_j)])^2`.
    Returns `map_accuracy_<users|items>` (the share of warm entities, >= `min_interactions`
    training interactions, whose argmin is their planted cluster), and the purity and adjusted
    Rand index of that assignment (`map_purity_*`, `map_ari_*`): what a per-entity loss
    decision reaches when the cluster rows are exactly right, the reference learned clusters'
    purity is read against. Two streaming passes over the training split; memory
    O(entities x planted clusters) (float32 sufficient statistics)."""
    from trainer.metrics import adjusted_rand_index, cluster_purity
    planted = load_planted_labels(data_dir)
    if planted is None or any(planted[t] is None for t in ENTITY_OF_TABLE):
        raise ValueError(f"{data_dir}: planted clusters of users and items are needed")
    pu, pi = planted["user"], planted["item"]
    ku, ki = int(pu.max()) + 1, int(pi.max()) + 1
    s = np.zeros((ku, ki)); n = np.zeros((ku, ki))
    total, count = 0.0, 0
    for u, i, y in _train_chunks(data_dir):
        np.add.at(s, (pu[u], pi[i]), y)
        np.add.at(n, (pu[u], pi[i]), 1.0)
        total, count = total + float(y.sum()), count + y.size
    mean = total / max(count, 1)
    block = np.where(n > 0, s / np.maximum(n, 1.0), mean)           # [ku, ki]
    # per entity and other-side planted cluster: label sum and count (float32, O(N x K))
    stats = {t: (np.zeros((len(planted[t]), k_other), np.float32),
                 np.zeros((len(planted[t]), k_other), np.float32))
             for t, k_other in (("user", ki), ("item", ku))}
    for u, i, y in _train_chunks(data_dir):
        for t, ent, other in (("user", u, pi[i]), ("item", i, pu[u])):
            k_other = stats[t][0].shape[1]
            flat = ent * k_other + other
            np.add.at(stats[t][0].reshape(-1), flat, y.astype(np.float32))
            np.add.at(stats[t][1].reshape(-1), flat, 1.0)
    out: dict[str, float] = {}
    for t, rows in (("user", block), ("item", block.T)):
        sums, counts = stats[t]
        best = np.empty(len(planted[t]), np.int64)
        for start in range(0, best.size, entity_chunk):     # L(k) up to sum y^2, per chunk
            sl = slice(start, start + entity_chunk)
            loss = counts[sl].astype(np.float64) @ (rows.T ** 2) - 2.0 * sums[sl].astype(np.float64) @ rows.T
            best[sl] = loss.argmin(axis=1)
        warm = counts.sum(axis=1) >= min_interactions
        key, truth = ENTITY_OF_TABLE[t], planted[t]
        out[f"map_accuracy_{key}"] = float(np.mean(best[warm] == truth[warm])) if warm.any() else float("nan")
        out[f"map_purity_{key}"] = cluster_purity(best[warm], truth[warm])
        out[f"map_ari_{key}"] = adjusted_rand_index(best[warm], truth[warm])
    return out
