"""A synthetic Criteo-like click dataset with planted clusters, generated and written chunk by
chunk (bounded memory, fully vectorised: a few seconds per million rows).

Features (defaults in brackets): `dense` [13] dense features dense_I1.. and `categorical` [26]
categorical features C1.., of which C1 is written as user_id and C2 as item_id (the roles
Criteo's C3/C4 play in `prepare criteo`; vocab/users.parquet, vocab/items.parquet) and C3.. as
sparse_C3.. (vocab/sparse_C3.parquet, ...). Ids are already dense (0..V-1, raw_id = str(id));
there is no OOV id.

Vocabulary sizes spread log-uniformly from `vocab_min` [10] to `vocab_max` [1e6] in descending
feature order: user_id has exactly `vocab_max` values, item_id the next size, and so on. Each
feature's values are drawn by Zipf-like popularity (the r-th most popular value has weight
about r^-alpha, alpha [1.05]: the floor of a continuous power-law draw, O(1) per value; ranks
shuffled so ids carry no information), so most values are rare or never drawn (train_count 0).

Planted click model. Each value of each categorical feature belongs to one of `clusters` [16]
planted clusters (DIR/planted/<entity>.parquet: id, cluster; entity as in vocab/), and each
(feature, cluster) has a latent vector in R^dim [8]. A fixed set of feature pairs (user_id x
item_id, then every further feature paired with one earlier feature drawn at random: a tree over
all features) defines
    logit = sum_pairs <latent_a[cluster(v_a)], latent_b[cluster(v_b)]> / scale
            + sum_features noise_f[v_f]  +  w . (dense - mean) / dense_scale  +  bias,
where noise_f[v] is a fixed small per-value term (their sum has std about `value_noise` [0.3]),
`scale` makes the pair sum's std `signal` [1.5], `dense_scale` makes the dense term's std
`dense_weight` [0.5] (both measured on a 200k-row pilot), and `bias` is solved on the pilot so
that mean(sigmoid(logit)) = `ctr` [0.25]. label = Bernoulli(sigmoid(logit)).
Dense features look like Criteo's after `prepare criteo`: log1p of a lognormal count, missing
(-> 0) with a per-feature probability up to 0.4.

Rows are split train/val by a seeded coin (`val_ratio` [0.1]); timestamp = row index. The output
is a deterministic function of the parameters (and `chunk_rows`). `CtrModel(params).logit(...)`
recomputes the planted logit of written rows (tests use it).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline import schema
from data_pipeline.dataset import (DatasetMeta, SplitWriter, atomic_output_dir, check_output,
                                   progress_bar, write_table)
from data_pipeline.errors import DataError

DEFAULTS: dict[str, Any] = dict(rows=100_000, vocab_max=1_000_000, vocab_min=10, categorical=26,
                                dense=13, clusters=16, seed=0, val_ratio=0.1, dim=8, alpha=1.05,
                                ctr=0.25, signal=1.5, value_noise=0.3, dense_weight=0.5)
CHUNK_ROWS = 1 << 18
PILOT_ROWS = 200_000


def ctr_params(**overrides: Any) -> dict[str, Any]:
    """The full, validated parameter set (defaults filled in)."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise DataError(f"unknown synthetic CTR parameters {sorted(unknown)} "
                        f"(known: {sorted(DEFAULTS)})")
    p = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    for key, low in (("rows", 1), ("vocab_max", 1), ("vocab_min", 1), ("categorical", 2),
                     ("dense", 0), ("clusters", 1), ("dim", 1)):
        p[key] = int(p[key])
        if p[key] < low:
            raise DataError(f"synthetic CTR: {key} must be >= {low}, got {p[key]}")
    p["seed"] = int(p["seed"])
    for key in ("val_ratio", "ctr"):
        p[key] = float(p[key])
        if not 0.0 < p[key] < 1.0:
            raise DataError(f"synthetic CTR: {key} must lie in (0, 1), got {p[key]}")
    for key in ("alpha", "signal", "value_noise", "dense_weight"):
        p[key] = float(p[key])
        if p[key] < 0:
            raise DataError(f"synthetic CTR: {key} must be >= 0, got {p[key]}")
    return p


def feature_names(categorical: int) -> list[tuple[str, str, str]]:
    """(raw name, column, vocab/planted entity) of each categorical feature."""
    out = [("C1", schema.USER, "users"), ("C2", schema.ITEM, "items")]
    out += [(f"C{i}", f"{schema.SPARSE_PREFIX}C{i}", f"{schema.SPARSE_PREFIX}C{i}")
            for i in range(3, categorical + 1)]
    return out


def vocab_sizes(categorical: int, vocab_min: int, vocab_max: int) -> list[int]:
    """Log-uniformly spread sizes, descending; the first is exactly vocab_max."""
    low = min(vocab_min, vocab_max)
    sizes = np.rint(np.geomspace(vocab_max, low, categorical)).astype(np.int64)
    sizes[0] = vocab_max
    return [int(max(1, s)) for s in sizes]


class CtrModel:
    """The planted model of one parameter set: popularity, clusters, latents, the click logit."""

    def __init__(self, params: Mapping[str, Any]):
        p = self.params = ctr_params(**params)
        rng = np.random.default_rng([p["seed"], 0])
        self.features = feature_names(p["categorical"])
        self.sizes = vocab_sizes(p["categorical"], p["vocab_min"], p["vocab_max"])
        k = p["clusters"]
        per_value_noise = p["value_noise"] / np.sqrt(p["categorical"])
        self.rank_to_id, self.cluster, self.noise, self.centers = [], [], [], []
        for size in self.sizes:
            self.rank_to_id.append(rng.permutation(size).astype(np.int64))
            cluster = rng.integers(0, k, size=size).astype(np.int32)
            if size >= k:                                   # no empty cluster where possible
                cluster[rng.permutation(size)[:k]] = np.arange(k, dtype=np.int32)
            self.cluster.append(cluster)
            self.noise.append((per_value_noise * rng.standard_normal(size)).astype(np.float32))
            self.centers.append(rng.standard_normal((k, p["dim"])))
        n = p["categorical"]
        self.pairs = [(0, 1)] + [(f, int(rng.integers(0, f))) for f in range(2, n)]
        self.pair_tables = [(self.centers[a] @ self.centers[b].T).ravel() for a, b in self.pairs]
        d = p["dense"]
        self.dense_mu = rng.uniform(0.0, 3.0, d)
        self.dense_sigma = rng.uniform(0.5, 1.5, d)
        self.dense_missing = rng.uniform(0.0, 0.4, d)
        self.dense_w = rng.standard_normal(d)
        # Calibration on a pilot sample: scales, then the bias that gives the target CTR.
        self.scale, self.dense_scale, self.dense_mean, self.bias = 1.0, 1.0, np.zeros(d), 0.0
        pilot = np.random.default_rng([p["seed"], 1])
        ids, dense = self.draw(pilot, PILOT_ROWS)
        interaction = self._interaction(ids)
        spread = float(interaction.std())
        self.scale = spread / p["signal"] if p["signal"] > 0 and spread > 0 else np.inf
        if d:
            self.dense_mean = dense.mean(axis=0).astype(np.float64)
            raw = (dense - self.dense_mean) @ self.dense_w
            spread = float(raw.std())
            self.dense_scale = (spread / p["dense_weight"]
                                if p["dense_weight"] > 0 and spread > 0 else np.inf)
        self.bias = _solve_bias(self.logit(ids, dense), p["ctr"])
        self.pilot_ctr = float(_sigmoid(self.logit(ids, dense)).mean())

    def draw(self, rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], np.ndarray]:
        """n rows: the id of each categorical feature (int64) and the dense matrix (float32)."""
        ids = [rank_to_id[_power_law_rank(rng.random(n), len(rank_to_id), self.params["alpha"])]
               for rank_to_id in self.rank_to_id]
        d = self.params["dense"]
        z = rng.standard_normal((n, d))
        counts = np.floor(np.exp(self.dense_mu + self.dense_sigma * z))
        missing = rng.random((n, d)) < self.dense_missing
        dense = np.where(missing, 0.0, np.log1p(counts)).astype(np.float32)
        return ids, dense

    def _interaction(self, ids: list[np.ndarray]) -> np.ndarray:
        k = self.params["clusters"]
        total = np.zeros(len(ids[0]), dtype=np.float64)
        for (a, b), table in zip(self.pairs, self.pair_tables):
            total += table[self.cluster[a][ids[a]].astype(np.int64) * k + self.cluster[b][ids[b]]]
        return total

    def logit(self, ids: list[np.ndarray], dense: np.ndarray) -> np.ndarray:
        """The planted click logit of rows given as per-feature id arrays (feature order) and
        the dense matrix (as written, float32)."""
        out = self._interaction(ids) / self.scale
        for noise, values in zip(self.noise, ids):
            out += noise[values]
        if self.params["dense"]:
            out += ((np.asarray(dense, dtype=np.float64) - self.dense_mean) @ self.dense_w
                    / self.dense_scale)
        return out + self.bias


def _power_law_rank(u: np.ndarray, size: int, alpha: float) -> np.ndarray:
    """Popularity ranks 0..size-1 from uniforms: floor of the inverse CDF of the density
    x^-alpha on [1, size + 1), so rank r has weight ~ (r + 1)^-alpha (Zipf-like) at O(1) cost
    per draw (no search over a size-long CDF)."""
    if abs(alpha - 1.0) < 1e-9:
        x = np.power(float(size + 1), u)
    else:
        e = 1.0 - alpha
        x = np.power(1.0 + u * ((size + 1.0) ** e - 1.0), 1.0 / e)
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, size - 1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _solve_bias(logit: np.ndarray, target: float) -> float:
    low, high = -40.0, 40.0
    for _ in range(60):
        mid = 0.5 * (low + high)
        if _sigmoid(logit + mid).mean() < target:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def generate_synthetic_ctr(out: str | os.PathLike, *, overwrite: bool = False,
                           chunk_rows: int = CHUNK_ROWS, **overrides: Any) -> DatasetMeta:
    """Generate and write the dataset (see the module docstring for the model)."""
    p = ctr_params(**overrides)
    check_output(out, overwrite)
    model = CtrModel(p)
    columns_of = [column for _, column, _ in model.features]
    sparse_names = columns_of[2:]
    dense_names = [f"{schema.DENSE_PREFIX}I{j}" for j in range(1, p["dense"] + 1)]
    arrow_schema = schema.arrow_schema(sparse_names, dense_names)
    train_count = [np.zeros(size, dtype=np.int64) for size in model.sizes]
    total = p["rows"]
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writers = {s: SplitWriter(tmp, s, arrow_schema) for s in ("train", "val")}
        with progress_bar(total, desc="synth-ctr") as bar:
            for chunk, start in enumerate(range(0, total, chunk_rows)):
                n = min(chunk_rows, total - start)
                rng = np.random.default_rng([p["seed"], 2, chunk])
                ids, dense = model.draw(rng, n)
                label = (rng.random(n) < _sigmoid(model.logit(ids, dense))).astype(np.float32)
                is_train = rng.random(n) >= p["val_ratio"]
                columns = {schema.LABEL: label,
                           schema.TIMESTAMP: np.arange(start, start + n, dtype=np.int64)}
                for f, (column, values) in enumerate(zip(columns_of, ids)):
                    columns[column] = values
                    train_count[f] += np.bincount(values[is_train], minlength=model.sizes[f])
                for j, name in enumerate(dense_names):
                    columns[name] = dense[:, j]
                for name, mask in (("train", is_train), ("val", ~is_train)):
                    writers[name].write(pa.table({k: v[mask] for k, v in columns.items()}))
                bar.update(n)
        splits = {name: w.close() for name, w in writers.items()}
        for f, (_, _, entity) in enumerate(model.features):
            ids = pa.array(np.arange(model.sizes[f], dtype=np.int64))
            write_table(pa.table({"id": ids, "raw_id": pc.cast(ids, pa.string()),
                                  "train_count": pa.array(train_count[f])}),
                        tmp / "vocab" / f"{entity}.parquet")
            write_table(pa.table({"id": ids, "cluster": pa.array(model.cluster[f].astype(np.int64))}),
                        tmp / "planted" / f"{entity}.parquet")
        meta = DatasetMeta(
            num_users=model.sizes[0], num_items=model.sizes[1], splits=splits, label_kind="click",
            sparse_features={name: size for name, size in zip(sparse_names, model.sizes[2:])},
            dense_features=dense_names, source="synthetic-ctr",
            split={"method": "random", "ratio": 1 - p["val_ratio"], "seed": p["seed"]},
            extra={"synthetic_ctr": p, "chunk_rows": chunk_rows, "user_col": "C1",
                   "item_col": "C2",
                   "vocab_sizes": {column: size for column, size in zip(columns_of, model.sizes)},
                   "pairs": [[columns_of[a], columns_of[b]] for a, b in model.pairs],
                   "bias": model.bias, "pilot_ctr": model.pilot_ctr})
        (tmp / "meta.json").write_text(meta.to_json())
    return meta


def ensure_synthetic_ctr(cache_root: str | os.PathLike, **overrides: Any) -> str:
    """The synthetic CTR dataset for `overrides` (defaults filled in), built once under
    cache_root/synth-ctr-<hash>/ (written to a temporary directory and renamed when complete)
    and reused by later calls: the trainer's `data.kind: synthetic_ctr`."""
    p = ctr_params(**overrides)
    digest = hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:16]
    path = pathlib.Path(cache_root) / f"synth-ctr-{digest}"
    if not (path / "meta.json").exists():
        generate_synthetic_ctr(path, overwrite=path.exists(), **p)
    return str(path)
