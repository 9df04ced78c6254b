"""Small raw inputs written into tmp dirs (no dependency on the datasets in ../shared)."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest


def write_udata(path: pathlib.Path, n: int = 500, users: int = 40, items: int = 60,
                seed: int = 0) -> np.ndarray:
    """An ML-100K style u.data (tab, no header); returns the rows [user, item, rating, ts]."""
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.integers(1, users + 1, n), rng.integers(1, items + 1, n),
                     rng.integers(1, 6, n), 880_000_000 + rng.permutation(n)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    return rows


def write_criteo(path: pathlib.Path, n: int = 300, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        ints = [str(rng.integers(-1, 100)) if rng.random() > 0.2 else "" for _ in range(13)]
        cats = [format(int(rng.integers(0, 30)), "08x") if rng.random() > 0.1 else ""
                for _ in range(26)]
        lines.append("\t".join([str(int(rng.random() < 0.3)), *ints, *cats]) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))


