"""`python -m data_pipeline inspect DIR`: a JSON summary of a prepared dataset, per split.
Streams each split by row groups, so memory stays bounded on large datasets."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from data_pipeline import schema
from data_pipeline.dataset import load_meta, load_train_counts
from data_pipeline.local import ParquetBatchReader

COLD_THRESHOLD = 5          # "rare" entities: fewer training interactions than this


def _label_histogram(counts: dict[float, int]) -> dict[str, int]:
    return {f"{value:g}": int(n) for value, n in sorted(counts.items())}


def summarize_split(directory: str | os.PathLike, split: str, user_train: np.ndarray,
                    item_train: np.ndarray) -> dict[str, Any]:
    reader = ParquetBatchReader(os.path.join(directory, split), batch_size=1 << 20, shuffle=False,
                                columns=[schema.USER, schema.ITEM, schema.LABEL])
    user_rows = np.zeros(len(user_train), dtype=np.int64)
    item_rows = np.zeros(len(item_train), dtype=np.int64)
    labels: dict[float, int] = {}
    for batch in reader:
        if len(batch[schema.USER]) and (batch[schema.USER].max() >= len(user_train)
                                        or batch[schema.ITEM].max() >= len(item_train)):
            raise ValueError(f"{directory}/{split}: ids beyond the vocabularies")
        user_rows += np.bincount(batch[schema.USER], minlength=len(user_train))
        item_rows += np.bincount(batch[schema.ITEM], minlength=len(item_train))
        values, counts = np.unique(batch[schema.LABEL], return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            labels[v] = labels.get(v, 0) + c
    rows = int(user_rows.sum())
    users, items = int((user_rows > 0).sum()), int((item_rows > 0).sum())
    out: dict[str, Any] = {"rows": rows, "users": users, "items": items,
                           "density": rows / (users * items) if users and items else 0.0}
    if len(labels) <= 32:
        out["label_histogram"] = _label_histogram(labels)
    else:
        values = np.array(list(labels)), np.array(list(labels.values()))
        edges = np.histogram_bin_edges(values[0], bins=10, weights=values[1])
        hist, _ = np.histogram(values[0], bins=edges, weights=values[1])
        out["label_histogram"] = {f"[{a:.3g},{b:.3g})": int(h) for a, b, h in zip(edges, edges[1:], hist)}
    out["label_mean"] = (sum(v * n for v, n in labels.items()) / rows) if rows else 0.0
    for entity, seen, train in (("users", user_rows, user_train), ("items", item_rows, item_train)):
        present = seen > 0
        out[f"cold_{entity}_share"] = float((train[present] == 0).mean()) if present.any() else 0.0
        out[f"cold_{entity}_row_share"] = float(seen[train == 0].sum() / rows) if rows else 0.0
        out[f"rare_{entity}_share"] = (float((train[present] < COLD_THRESHOLD).mean())
                                       if present.any() else 0.0)
    return out


def summarize(directory: str | os.PathLike) -> dict[str, Any]:
    """Rows, users, items, density, label histogram and cold shares per split. "cold" means
    train_count == 0; "rare" means train_count < 5; *_share is over the split's distinct
    entities, *_row_share over its rows."""
    meta = load_meta(directory)
    user_train = load_train_counts(directory, "users")
    item_train = load_train_counts(directory, "items")
    return {"path": str(directory), "source": meta.source, "label_kind": meta.label_kind,
            "num_users": meta.num_users, "num_items": meta.num_items,
            "rows": int(sum(meta.splits.values())), "split": meta.split,
            "sparse_features": meta.sparse_features, "dense_features": meta.dense_features,
            "cold_users_share": float((user_train == 0).mean()),
            "cold_items_share": float((item_train == 0).mean()),
            "splits": {name: summarize_split(directory, name, user_train, item_train)
                       for name in meta.splits}}
