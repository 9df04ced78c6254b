"""Evaluation metrics: regression (MSE/RMSE/MAE), clicks (AUC/logloss/accuracy), each broken
down by cold and warm users and items, a streaming accumulator, cluster-size diagnostics, and
how well learned clusters recover planted ones (purity, adjusted Rand index; sparse contingency).

Everything is vectorised numpy in float64 and accepts torch tensors or numpy arrays. Keys are flat
snake_case: `rmse`, `rmse_cold_items`, `rmse_warm_users`, `count_cold_items`, ... An empty slice
gives NaN (and count 0), never an error. `rmse_cold` / `rmse_warm` (and the same for every base
metric) are aliases of the item slices: items are the table CEL clusters by default.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

KINDS = ("rating", "click")
SLICES = ("cold_items", "warm_items", "cold_users", "warm_users")
REGRESSION_KEYS = ("mse", "rmse", "mae")
CLASSIFICATION_KEYS = ("auc", "logloss", "ne", "accuracy")


def _np(x: Any, dtype=np.float64) -> np.ndarray:
    """1-D numpy copy of a tensor/array/sequence."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"metric kind must be rating|click, got {kind!r}")


# ----------------------------------------------------------------------------- base metrics
def regression_metrics(pred: Any, label: Any) -> dict[str, float]:
    """`{"mse", "rmse", "mae"}` of predictions against labels (NaN when empty)."""
    p, y = _np(pred), _np(label)
    if p.shape != y.shape:
        raise ValueError(f"pred and label sizes differ: {p.shape} vs {y.shape}")
    if p.size == 0:
        return {k: float("nan") for k in REGRESSION_KEYS}
    err = p - y
    mse = float(np.mean(err * err))
    return {"mse": mse, "rmse": float(np.sqrt(mse)), "mae": float(np.mean(np.abs(err)))}


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)                      # rank of the last member of each value group
    mean_rank = ends - (counts - 1) / 2.0
    return mean_rank[inverse.reshape(-1)]


def auc_score(score: Any, label: Any) -> float:
    """ROC AUC by the Mann-Whitney rank statistic (ties count one half); labels >= 0.5 are
    positive. NaN when either class is absent."""
    s, y = _np(score), _np(label) >= 0.5
    num_pos = int(y.sum())
    num_neg = y.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    return float((ranks[y].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def classification_metrics(logit: Any, label: Any) -> dict[str, float]:
    """`{"auc", "logloss", "accuracy"}` of click logits against 0/1 labels (NaN when empty)."""
    z, y = _np(logit), _np(label)
    if z.shape != y.shape:
        raise ValueError(f"logit and label sizes differ: {z.shape} vs {y.shape}")
    if z.size == 0:
        return {k: float("nan") for k in CLASSIFICATION_KEYS}
    ce = np.logaddexp(0.0, z) - y * z                         # stable BCE with logits
    logloss = float(np.mean(ce))
    accuracy = float(np.mean((z > 0) == (y >= 0.5)))
    return {"auc": auc_score(z, y), "logloss": logloss, "ne": normalized_entropy(ce.sum(), y),
            "accuracy": accuracy}


def normalized_entropy(ce_sum: float, label: np.ndarray) -> float:
    """Normalized entropy (He et al., 2014): the summed log-loss divided by that of always
    predicting the base rate; below 1 beats the base rate. The normalisation is TorchRec's
    (`torchrec.metrics.ne.compute_ne`); NaN when either class is absent."""
    import torch
    from torchrec.metrics.ne import compute_ne
    pos = float((label >= 0.5).sum())
    neg = float(label.size) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    t = lambda v: torch.tensor([v], dtype=torch.float64)   # noqa: E731
    bits = float(ce_sum) / np.log(2.0)                 # TorchRec's cross-entropies are in bits
    return float(compute_ne(t(bits), t(float(label.size)), t(pos), t(neg), eta=1e-12))


def base_metrics(pred: Any, label: Any, kind: str) -> dict[str, float]:
    _check_kind(kind)
    return regression_metrics(pred, label) if kind == "rating" else classification_metrics(pred, label)


# ----------------------------------------------------------------------------- slices
def cold_mask(ids: Any, train_counts: Any, cold_threshold: int) -> np.ndarray:
    """True where the entity has fewer than `cold_threshold` training interactions (ids beyond
    the counts array, i.e. never seen in training, are cold)."""
    ids = _np(ids, np.int64)
    counts = _np(train_counts, np.int64)
    known = (ids >= 0) & (ids < counts.size)
    seen = np.zeros(ids.shape, dtype=np.int64)
    seen[known] = counts[ids[known]]
    return seen < cold_threshold


def metrics_from_masks(pred: Any, label: Any, kind: str, cold_users: np.ndarray | None = None,
                       cold_items: np.ndarray | None = None) -> dict[str, float]:
    """Overall metrics plus those of the cold/warm slices given by boolean masks (a side whose
    mask is None gets no slice keys)."""
    p, y = _np(pred), _np(label)
    out: dict[str, float] = dict(base_metrics(p, y, kind))
    out["count"] = int(p.size)
    for side, mask in (("items", cold_items), ("users", cold_users)):
        if mask is None:
            continue
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        for name, select in ((f"cold_{side}", mask), (f"warm_{side}", ~mask)):
            for key, value in base_metrics(p[select], y[select], kind).items():
                out[f"{key}_{name}"] = value
            out[f"count_{name}"] = int(select.sum())
    if cold_items is not None:
        for key in [k for k in out if k.endswith(("_cold_items", "_warm_items"))]:
            out[key[: -len("_items")]] = out[key]
    return out


def sliced_metrics(pred: Any, label: Any, user_ids: Any, item_ids: Any, user_train_counts: Any,
                   item_train_counts: Any, cold_threshold: int, kind: str) -> dict[str, float]:
    """Overall metrics and their cold/warm user and item breakdowns, e.g. for ratings `rmse`,
    `rmse_cold_items`, `rmse_warm_items`, `rmse_cold_users`, `rmse_warm_users`,
    `count_cold_items`, ... and the item aliases `rmse_cold`, `rmse_warm`, `count_cold`."""
    return metrics_from_masks(pred, label, kind,
                              cold_users=cold_mask(user_ids, user_train_counts, cold_threshold),
                              cold_items=cold_mask(item_ids, item_train_counts, cold_threshold))


class MetricAccumulator:
    """Collects evaluation batches and computes `sliced_metrics` at the end. Keeps every
    prediction (AUC needs them all); per-sample cold flags are resolved at `update` so the
    state that ranks exchange (`state()` / `from_states`) is small and self-contained."""

    def __init__(self, kind: str = "rating", user_train_counts: Any = None,
                 item_train_counts: Any = None, cold_threshold: int = 5):
        _check_kind(kind)
        self.kind = kind
        self.cold_threshold = int(cold_threshold)
        self._counts = {"user": None if user_train_counts is None else _np(user_train_counts, np.int64),
                        "item": None if item_train_counts is None else _np(item_train_counts, np.int64)}
        self._pred: list[np.ndarray] = []
        self._label: list[np.ndarray] = []
        self._cold: dict[str, list[np.ndarray] | None] = {
            side: [] if counts is not None else None for side, counts in self._counts.items()}

    def update(self, pred: Any, label: Any, user_ids: Any = None, item_ids: Any = None) -> None:
        p, y = _np(pred, np.float32), _np(label, np.float32)
        if p.shape != y.shape:
            raise ValueError(f"pred and label sizes differ: {p.shape} vs {y.shape}")
        for side, ids in (("user", user_ids), ("item", item_ids)):
            flags = self._cold[side]
            if flags is None:
                continue
            if ids is None:                     # a batch without ids ends that side's slices
                self._cold[side] = None
                continue
            mask = cold_mask(ids, self._counts[side], self.cold_threshold)
            if mask.shape != p.shape:
                raise ValueError(f"{side} ids and pred sizes differ: {mask.shape} vs {p.shape}")
            flags.append(mask)
        self._pred.append(p)
        self._label.append(y)

    def __len__(self) -> int:
        return int(sum(p.size for p in self._pred))

    def state(self) -> dict:
        """Picklable accumulated state (for gathering across ranks)."""
        cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
        return {"kind": self.kind, "cold_threshold": self.cold_threshold,
                "pred": cat(self._pred, np.float32), "label": cat(self._label, np.float32),
                **{f"cold_{side}": None if flags is None else cat(flags, bool)
                   for side, flags in self._cold.items()}}

    @classmethod
    def from_states(cls, states: Sequence[dict]) -> "MetricAccumulator":
        """One accumulator holding the union of several ranks' `state()`s."""
        if not states:
            raise ValueError("from_states needs at least one state")
        kinds = {s["kind"] for s in states}
        if len(kinds) != 1:
            raise ValueError(f"cannot merge states of different kinds: {sorted(kinds)}")
        acc = cls(kind=states[0]["kind"], cold_threshold=states[0]["cold_threshold"])
        acc._pred = [s["pred"] for s in states]
        acc._label = [s["label"] for s in states]
        for side in ("user", "item"):
            parts = [s[f"cold_{side}"] for s in states]
            acc._cold[side] = None if any(p is None for p in parts) else list(parts)
        return acc

    def compute(self) -> dict[str, float]:
        s = self.state()
        return metrics_from_masks(s["pred"], s["label"], self.kind,
                                  cold_users=s["cold_user"], cold_items=s["cold_item"])


# ----------------------------------------------------------------------------- clusters
def gini(values: Any) -> float:
    """Gini coefficient of non-negative values: 0 when all equal, (n-1)/n when one holds all."""
    x = np.sort(_np(values))
    n, total = x.size, x.sum()
    if n == 0:
        return float("nan")
    if total <= 0:
        return 0.0
    weights = 2.0 * np.arange(1, n + 1) - n - 1
    return float((weights * x).sum() / (n * total))


def cluster_size_histogram(assignment: Any, num_clusters: int) -> dict[str, Any]:
    """Member counts of the `num_clusters` active clusters of an assignment map:
    `sizes` (largest first), `min`, `median`, `max`, `mean`, `num_empty`, `gini`."""
    a = _np(assignment, np.int64)
    if a.size and (a.min() < 0 or a.max() >= num_clusters):
        raise ValueError(f"assignment holds cluster ids outside [0, {num_clusters})")
    sizes = np.bincount(a, minlength=num_clusters)[:num_clusters] if num_clusters > 0 \
        else np.zeros(0, np.int64)
    nan = float("nan")
    return {"sizes": sorted((int(s) for s in sizes), reverse=True),
            "num_clusters": int(num_clusters),
            "num_entities": int(a.size),
            "num_empty": int((sizes == 0).sum()),
            "min": int(sizes.min()) if sizes.size else nan,
            "median": float(np.median(sizes)) if sizes.size else nan,
            "max": int(sizes.max()) if sizes.size else nan,
            "mean": float(sizes.mean()) if sizes.size else nan,
            "gini": gini(sizes)}


# ----------------------------------------------------------------------------- planted clusters
def _dense_labels(x: Any) -> tuple[np.ndarray, int]:
    """Labels relabelled to `0..k-1` (order kept) and `k`. Non-negative integer labels of modest
    range go through a bincount presence table (O(n + max)); anything else through np.unique."""
    a = _np(x, np.int64) if hasattr(x, "detach") else np.asarray(x).reshape(-1)
    if a.size == 0:
        return np.zeros(0, np.int64), 0
    if np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.int64, copy=False)
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi < max(4 * a.size, 1 << 16):
            present = np.bincount(a, minlength=hi + 1) > 0
            code = np.cumsum(present, dtype=np.int64) - 1
            return code[a], int(present.sum())
    uniq, inverse = np.unique(a, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64, copy=False), int(uniq.size)


def contingency_counts(learned: Any, planted: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency table of two labelings of the same entities: `(row, col, count)` for
    every non-empty cell, rows (learned clusters) relabelled `0..k_l-1` and sorted, columns
    (planted clusters) `0..k_p-1`. Built from the combined int64 code `row * k_p + col`: a
    bincount when the dense table is no larger than the input, np.unique otherwise, so memory
    stays O(entities) whatever the cluster counts."""
    rows, n_rows = _dense_labels(learned)
    cols, n_cols = _dense_labels(planted)
    if rows.shape != cols.shape:
        raise ValueError(f"labelings differ in size: {rows.size} vs {cols.size}")
    code = rows * n_cols + cols
    if n_rows * n_cols <= max(2 * code.size, 1 << 16):
        counts = np.bincount(code, minlength=n_rows * n_cols)
        cells = np.flatnonzero(counts)
        counts = counts[cells]
    else:
        cells, counts = np.unique(code, return_counts=True)
    return cells // max(n_cols, 1), cells % max(n_cols, 1), counts.astype(np.int64)


def cluster_purity(learned: Any, planted: Any) -> float:
    """Share of entities that belong to their learned cluster's majority planted cluster: 1 when
    every learned cluster lies inside one planted cluster (a refinement is pure), lower when a
    learned cluster mixes planted ones. NaN for no entities."""
    rows, _, counts = contingency_counts(learned, planted)
    if counts.size == 0:
        return float("nan")
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])   # rows are sorted
    return float(np.maximum.reduceat(counts, starts).sum() / counts.sum())


def _pairs(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float((x * (x - 1.0) / 2.0).sum())


def adjusted_rand_index(learned: Any, planted: Any) -> float:
    """Adjusted Rand index (Hubert & Arabie) of two labelings of the same entities: 1 for the
    same partition (whatever the label names), about 0 for independent ones, negative below
    chance. Two trivially equal partitions (both one cluster or both all singletons) give 1.
    NaN for no entities."""
    rows, cols, counts = contingency_counts(learned, planted)
    n = int(counts.sum())
    if n == 0:
        return float("nan")
    index = _pairs(counts)
    sum_rows = _pairs(np.bincount(rows, weights=counts))
    sum_cols = _pairs(np.bincount(cols, weights=counts))
    expected = sum_rows * sum_cols / (n * (n - 1.0) / 2.0) if n > 1 else 0.0
    top = (sum_rows + sum_cols) / 2.0
    if top == expected:
        return 1.0
    return float((index - expected) / (top - expected))


def planted_recovery(assignments: dict[str, Any], planted: dict[str, Any],
                     train_counts: dict[str, Any], min_interactions: int = 5) -> dict[str, float]:
    """`purity_<key>` and `ari_<key>` of each learned assignment map against the planted
    clusters, over the entities with at least `min_interactions` training interactions
    (keys as in `assignments`, e.g. users / items; a key without planted labels is skipped)."""
    out: dict[str, float] = {}
    for key, learned in assignments.items():
        if key not in planted or planted[key] is None:
            continue
        learned, truth = _np(learned, np.int64), _np(planted[key], np.int64)
        counts = _np(train_counts[key], np.int64)
        if not learned.size == truth.size == counts.size:
            raise ValueError(f"{key}: assignment ({learned.size}), planted ({truth.size}) and "
                             f"train counts ({counts.size}) cover different numbers of entities")
        warm = counts >= min_interactions
        out[f"purity_{key}"] = cluster_purity(learned[warm], truth[warm])
        out[f"ari_{key}"] = adjusted_rand_index(learned[warm], truth[warm])
    return out
