"""Train/validation splits as row indices (in output order), all vectorised.

reference   the CEL authors' MovieLens split: RandomState(seed).permutation(n); the first
            int(0.8 * n) + 1 rows of that order train, the rest validate (80,000 / 19,999 on
            ML-100K), both written in permutation order.
random      a seeded random `ratio` of rows train (file order kept within each split).
leave-last  per user, the last k interactions by timestamp (ties: file order) validate; users
            with <= k interactions keep all of theirs in train.
temporal    rows with timestamp < cut train, the rest validate; the cut is a timestamp or the
            timestamp at quantile q.
"""
from __future__ import annotations

import numpy as np

from data_pipeline.errors import DataError

METHODS = ("reference", "random", "leave-last", "temporal")


def reference_split(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    order = np.random.RandomState(seed=seed).permutation(n)
    n_train = int(0.8 * n) + 1
    return {"train": order[:n_train].astype(np.int64), "val": order[n_train:].astype(np.int64)}


def random_split(n: int, ratio: float = 0.8, seed: int = 0) -> dict[str, np.ndarray]:
    if not 0.0 < ratio < 1.0:
        raise DataError(f"--ratio must lie in (0, 1), got {ratio}")
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(ratio * n))
    return {"train": np.sort(order[:n_train]).astype(np.int64),
            "val": np.sort(order[n_train:]).astype(np.int64)}


def leave_last_split(user: np.ndarray, timestamp: np.ndarray, k: int = 1) -> dict[str, np.ndarray]:
    if k < 1:
        raise DataError(f"--k must be >= 1, got {k}")
    n = len(user)
    order = np.lexsort((np.arange(n), timestamp, user))          # by user, then time, then row
    sorted_user = user[order]
    counts = np.bincount(sorted_user)
    group_end = np.cumsum(counts)[sorted_user]                    # one past each row's user block
    from_end = group_end - np.arange(n) - 1                       # 0 = the user's last interaction
    is_val = np.zeros(n, dtype=bool)
    is_val[order] = (from_end < k) & (counts[sorted_user] > k)
    return {"train": np.flatnonzero(~is_val), "val": np.flatnonzero(is_val)}


def temporal_split(timestamp: np.ndarray, cut: int | None = None,
                   cut_quantile: float | None = None) -> dict[str, np.ndarray]:
    if (cut is None) == (cut_quantile is None):
        raise DataError("temporal split needs exactly one of --cut T or --cut-quantile q")
    if cut is None:
        if not 0.0 < cut_quantile < 1.0:
            raise DataError(f"--cut-quantile must lie in (0, 1), got {cut_quantile}")
        cut = int(np.sort(timestamp)[int(cut_quantile * len(timestamp))])
    is_train = timestamp < cut
    if not is_train.any() or is_train.all():
        raise DataError(f"temporal cut {cut} leaves an empty split (timestamps "
                        f"{int(timestamp.min())}..{int(timestamp.max())})")
    return {"train": np.flatnonzero(is_train), "val": np.flatnonzero(~is_train)}


def make_split(method: str, user: np.ndarray, timestamp: np.ndarray, *, seed: int = 0,
               ratio: float = 0.8, k: int = 1, cut: int | None = None,
               cut_quantile: float | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Row indices per split and a description of the split for meta.json."""
    n = len(user)
    if method == "reference":
        return reference_split(n, seed), {"method": method, "seed": seed}
    if method == "random":
        return random_split(n, ratio, seed), {"method": method, "ratio": ratio, "seed": seed}
    if method == "leave-last":
        return leave_last_split(user, timestamp, k), {"method": method, "k": k}
    if method == "temporal":
        rows = temporal_split(timestamp, cut, cut_quantile)
        return rows, {"method": method, "cut": cut, "cut_quantile": cut_quantile,
                      "cut_timestamp": int(timestamp[rows["val"]].min())}
    raise DataError(f"unknown split {method!r} (choose from {', '.join(METHODS)})")
