"""Synthetic interactions with planted clusters and power-law popularity: the embedded default
dataset, and a scale test (1e7+ rows are generated and written chunk by chunk).

Every user and item belongs to one of `clusters` planted clusters; its latent vector is its
cluster's center plus a little noise. Users and items are drawn by Zipf-like popularity
(weight of the r-th most popular entity ~ r^-alpha, ranks shuffled so ids carry no
information), so many entities are cold. A pair's score is the standardised dot product of
their latents plus Gaussian noise; ratings are its quantile bins 1..5 (roughly MovieLens'
histogram), clicks a Bernoulli draw of sigmoid(1.5 * score - 1.1) (about 30% positive).
Ids are already dense (0..users-1, 0..items-1); entities never drawn are in the vocabularies with
train_count 0. Rows are split train/val by a seeded coin (`val_ratio`); the timestamp is the row
index. Duplicate (user, item) pairs can occur, as in real logs. DIR/planted/{users,items}.parquet
hold each entity's planted cluster.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

import numpy as np
import pyarrow as pa

from data_pipeline import schema
from data_pipeline.dataset import (DatasetMeta, SplitWriter, atomic_output_dir, check_output,
                                   progress_bar, vocab_table, write_table)
from data_pipeline.errors import DataError

DEFAULTS: dict[str, Any] = dict(users=2000, items=1000, interactions=100_000, clusters=8, seed=0,
                                label="rating", dim=8, val_ratio=0.2, user_alpha=1.0,
                                item_alpha=1.1, entity_noise=0.3, score_noise=0.5)
CHUNK_ROWS = 1 << 20
RATING_QUANTILES = (0.06, 0.17, 0.44, 0.79)


def _params(**overrides: Any) -> dict[str, Any]:
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise DataError(f"unknown synthetic parameters {sorted(unknown)} (known: {sorted(DEFAULTS)})")
    params = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    for key in ("users", "items", "interactions", "clusters", "dim"):
        if int(params[key]) < 1:
            raise DataError(f"synthetic: {key} must be >= 1, got {params[key]}")
        params[key] = int(params[key])
    if params["clusters"] > min(params["users"], params["items"]):
        raise DataError(f"synthetic: clusters ({params['clusters']}) exceeds users or items")
    if params["label"] not in ("rating", "click"):
        raise DataError(f"synthetic: label must be rating|click, got {params['label']!r}")
    if not 0.0 < float(params["val_ratio"]) < 1.0:
        raise DataError(f"synthetic: val_ratio must lie in (0, 1), got {params['val_ratio']}")
    params["seed"] = int(params["seed"])
    return params


def _popularity_cdf(n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    weight = np.arange(1, n + 1, dtype=np.float64) ** -float(alpha)
    weight = weight[rng.permutation(n)]
    cdf = np.cumsum(weight)
    return cdf / cdf[-1]


def _latents(n: int, clusters: int, dim: int, noise: float, rng: np.random.Generator):
    assignment = rng.integers(0, clusters, size=n)
    assignment[rng.permutation(n)[:clusters]] = np.arange(clusters)     # no empty cluster
    centers = rng.standard_normal((clusters, dim))
    latent = centers[assignment] + noise * rng.standard_normal((n, dim))
    return assignment.astype(np.int64), latent.astype(np.float32)


def generate_synthetic(out: str | os.PathLike, *, overwrite: bool = False,
                       chunk_rows: int = CHUNK_ROWS, **overrides: Any) -> DatasetMeta:
    """Generate and write the dataset (see the module docstring for the model)."""
    p = _params(**overrides)
    check_output(out, overwrite)
    base = np.random.default_rng([p["seed"], 0])
    user_cluster, user_latent = _latents(p["users"], p["clusters"], p["dim"], p["entity_noise"], base)
    item_cluster, item_latent = _latents(p["items"], p["clusters"], p["dim"], p["entity_noise"], base)
    user_cdf = _popularity_cdf(p["users"], p["user_alpha"], base)
    item_cdf = _popularity_cdf(p["items"], p["item_alpha"], base)

    def draw(rng: np.random.Generator, n: int):
        users = np.minimum(np.searchsorted(user_cdf, rng.random(n), side="right"), p["users"] - 1)
        items = np.minimum(np.searchsorted(item_cdf, rng.random(n), side="right"), p["items"] - 1)
        raw = np.einsum("nd,nd->n", user_latent[users], item_latent[items]) / np.sqrt(p["dim"])
        return users, items, raw

    pilot = np.random.default_rng([p["seed"], 1])
    _, _, pilot_raw = draw(pilot, 100_000)
    mean, std = float(pilot_raw.mean()), float(pilot_raw.std()) or 1.0
    pilot_score = (pilot_raw - mean) / std + p["score_noise"] * pilot.standard_normal(len(pilot_raw))
    thresholds = np.quantile(pilot_score, RATING_QUANTILES)

    arrow_schema = schema.arrow_schema()
    user_count = np.zeros(p["users"], dtype=np.int64)
    item_count = np.zeros(p["items"], dtype=np.int64)
    total = p["interactions"]
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writers = {s: SplitWriter(tmp, s, arrow_schema) for s in ("train", "val")}
        with progress_bar(total, desc="synth") as bar:
            for chunk, start in enumerate(range(0, total, chunk_rows)):
                n = min(chunk_rows, total - start)
                rng = np.random.default_rng([p["seed"], 2, chunk])
                users, items, raw = draw(rng, n)
                score = (raw - mean) / std + p["score_noise"] * rng.standard_normal(n)
                if p["label"] == "rating":
                    label = (1 + np.searchsorted(thresholds, score)).astype(np.float32)
                else:
                    click_p = 1.0 / (1.0 + np.exp(-(1.5 * score - 1.1)))
                    label = (rng.random(n) < click_p).astype(np.float32)
                is_train = rng.random(n) >= p["val_ratio"]
                columns = {schema.USER: users.astype(np.int64), schema.ITEM: items.astype(np.int64),
                           schema.LABEL: label,
                           schema.TIMESTAMP: np.arange(start, start + n, dtype=np.int64)}
                user_count += np.bincount(users[is_train], minlength=p["users"])
                item_count += np.bincount(items[is_train], minlength=p["items"])
                for name, mask in (("train", is_train), ("val", ~is_train)):
                    writers[name].write(pa.table({k: v[mask] for k, v in columns.items()}))
                bar.update(n)
        splits = {name: w.close() for name, w in writers.items()}
        for entity, counts in (("users", user_count), ("items", item_count)):
            ids = np.arange(len(counts), dtype=np.int64)
            write_table(vocab_table(pa.array(ids), counts), tmp / "vocab" / f"{entity}.parquet")
        for entity, cluster in (("users", user_cluster), ("items", item_cluster)):
            write_table(pa.table({"id": np.arange(len(cluster), dtype=np.int64), "cluster": cluster}),
                        tmp / "planted" / f"{entity}.parquet")
        meta = DatasetMeta(num_users=p["users"], num_items=p["items"], splits=splits,
                           label_kind=p["label"], source="synthetic",
                           split={"method": "random", "ratio": 1 - p["val_ratio"], "seed": p["seed"]},
                           extra={"synthetic": p, "rating_thresholds": thresholds.tolist()})
        (tmp / "meta.json").write_text(meta.to_json())
    return meta


def params_hash(**overrides: Any) -> str:
    """A short stable hash of the full parameter set (defaults filled in)."""
    text = json.dumps(_params(**overrides), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_synthetic(cache_root: str | os.PathLike, **params: Any) -> str:
    """The synthetic dataset for `params`, built once under cache_root/synth-<hash>/ (written to
    a temporary directory and renamed when complete) and reused by later calls."""
    path = pathlib.Path(cache_root) / f"synth-{params_hash(**params)}"
    if not (path / "meta.json").exists():
        generate_synthetic(path, overwrite=path.exists(), **params)
    return str(path)
