"""Why CEL does not recover the planted clusters at ~10 interactions per entity: two probes.

    python -m bench.planted_probe [--size 100000] [--planted 16] [--epochs 4]

1. `cosim`: hard alternating co-clustering on the planted data itself, no embeddings, no SGD:
   the "cluster rows" are the block means `B[a, b]` of the current (user cluster, item cluster)
   pairs; each round reassigns every user, then every item, to its loss-minimising cluster,
   moving only if the loss falls by more than `gate x` the mean loss per interaction (0: the
   reference's argmin). Started at the planted assignment (does argmin keep it?) and at a random
   one, 15 rounds, K = planted; and with 4x planted clusters from a random start and top down
   (doubling by residual-profile PCA, GPCA's shape with exact statistics). Isolates the
   reassignment rule and the start from SGD and windows.
2. `trainer`: the real trainer on the scale bench's data (`--size` entities per table, exact
   reassignment, 64 clusters) and on the embedded default (`configs/synthetic_small.yaml`),
   with `cel.reassign_min_gain` swept, beside the full model and the oracle.

Prints a table and writes bench/results/planted_probe.json. Purity is over warm entities
(>= 5 training interactions), as everywhere.
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np

from bench.common import print_table, write_results
from bench.scale_bench import base_overrides, run_one
from data_pipeline.dataset import load_planted
from data_pipeline.synthetic import ensure_synthetic
from trainer.metrics import cluster_purity

COLUMNS = ["dataset", "probe", "start", "clusters", "gate", "val_rmse", "val_rmse_cold",
           "purity_users", "purity_items"]


def _load(data_dir, split: str):
    from data_pipeline import schema
    from data_pipeline.dataset import read_parquet_file, split_dir, split_files
    parts = [read_parquet_file(f, [schema.USER, schema.ITEM, schema.LABEL])
             for f in split_files(split_dir(data_dir, split))]
    cols = [np.concatenate([p.column(c).to_numpy() for p in parts]) for c in range(3)]
    return cols[0].astype(np.int64), cols[1].astype(np.int64), cols[2].astype(np.float64)


def cosim(data_dir, start: str, gate: float, rounds: int = 15, seed: int = 0,
          clusters: int | None = None) -> dict:
    """Hard alternating co-clustering with block-mean rows (see the module docstring), with
    `clusters` per side (default: the planted count). `start`: `planted`, `random`, or
    `topdown` (from one cluster, double every cluster per event by the sign of its members'
    residual profiles on their top principal direction, all data, then 2 rounds; GPCA's
    top-down shape with exact statistics)."""
    u, i, y = _load(data_dir, "train")
    vu, vi, vy = _load(data_dir, "val")
    pu, pi = load_planted(data_dir, "users"), load_planted(data_dir, "items")
    k = clusters or int(max(pu.max(), pi.max())) + 1
    cu, ci = np.bincount(u, minlength=pu.size), np.bincount(i, minlength=pi.size)
    rng = np.random.default_rng(seed)
    if start == "planted":
        au, ai = pu.copy(), pi.copy()
    elif start == "random":
        au, ai = rng.integers(0, k, pu.size), rng.integers(0, k, pi.size)
    elif start == "topdown":
        au, ai = np.zeros(pu.size, np.int64), np.zeros(pi.size, np.int64)
    else:
        raise ValueError(f"start must be planted|random|topdown, got {start!r}")
    mean = y.mean()
    active = [1, 1] if start == "topdown" else [k, k]

    def blocks():
        n = np.zeros((k, k)); s = np.zeros((k, k))
        np.add.at(n, (au[u], ai[i]), 1.0); np.add.at(s, (au[u], ai[i]), y)
        return (s + 2.0 * mean) / (n + 2.0)            # two pseudo-ratings at the global mean

    def reassign(ent, other, rows, cur, m):            # rows: [k (own), k (other)]; m active
        n = np.zeros((cur.size, k)); s = np.zeros((cur.size, k))
        np.add.at(n, (ent, other), 1.0); np.add.at(s, (ent, other), y)
        loss = (n @ (rows.T ** 2) - 2.0 * s @ rows.T)[:, :m]   # up to sum y^2 per entity
        sigma2 = np.mean((y - rows[cur[ent], other]) ** 2)
        best = loss.argmin(1)
        gain = loss[np.arange(cur.size), cur] - loss[np.arange(cur.size), best]
        return np.where((n.sum(1) > 0) & (gain > gate * sigma2), best, cur)

    def split(ent, other, rows, cur, m):                # double the m active clusters
        profile = np.zeros((cur.size, k))
        np.add.at(profile, (ent, other), y - rows[cur[ent], other])
        seen = np.bincount(ent, minlength=cur.size) > 0
        new, nxt = cur.copy(), m
        for c in range(m):                               # per cluster (a probe, not a hot path)
            members = np.nonzero((cur == c) & seen)[0]
            if members.size < 2 or nxt >= k:
                continue
            x = profile[members] - profile[members].mean(0)
            side = x @ np.linalg.eigh(x.T @ x)[1][:, -1] < 0
            if side.any() and not side.all():
                new[members[side]], nxt = nxt, nxt + 1
        return new, nxt

    while start == "topdown" and min(active) < k:
        au, active[0] = split(u, ai[i], blocks(), au, active[0])
        ai, active[1] = split(i, au[u], blocks().T, ai, active[1])
        for _ in range(2):
            au = reassign(u, ai[i], blocks(), au, active[0])
            ai = reassign(i, au[u], blocks().T, ai, active[1])
    for _ in range(rounds):
        au = reassign(u, ai[i], blocks(), au, active[0])
        ai = reassign(i, au[u], blocks().T, ai, active[1])
    rows = blocks()
    pred = rows[au[vu], ai[vi]]
    cold = (cu[vu] < 5) | (ci[vi] < 5)
    return {"val_rmse": float(np.sqrt(np.mean((pred - vy) ** 2))),
            "val_rmse_cold": float(np.sqrt(np.mean((pred[cold] - vy[cold]) ** 2))),
            "purity_users": cluster_purity(au[cu >= 5], pu[cu >= 5]),
            "purity_items": cluster_purity(ai[ci >= 5], pi[ci >= 5]),
            "clusters": k}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--planted", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--gates", type=float, nargs="+", default=[0, 2, 4, 8])
    p.add_argument("--min-gains", type=float, nargs="+", default=[0, 3, 6, 10])
    p.add_argument("--small-min-gains", type=float, nargs="+", default=[0, 1, 3, 6])
    p.add_argument("--cache", default="data/cache")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--name", default="planted_probe")
    args = p.parse_args(argv)
    scale = dict(users=args.size, items=args.size, interactions=10 * args.size,
                 clusters=args.planted, seed=0, label="rating")
    data_dir = ensure_synthetic(args.cache, **scale)
    name = f"planted_synthetic_{args.size}"
    records = []
    runs = [(start, gate, None) for start in ("planted", "random") for gate in args.gates]
    runs += [(start, gate, 4 * args.planted) for start in ("random", "topdown") for gate in (0, 4)]
    for start, gate, clusters in runs:
        rec = {"dataset": name, "probe": "cosim", "start": start, "gate": gate,
               **cosim(data_dir, start, gate, clusters=clusters)}
        records.append(rec)
        print(f"[probe] cosim {start} k {rec['clusters']} gate {gate}: rmse {rec['val_rmse']:.4f} "
              f"purity {rec['purity_users']:.3f} / {rec['purity_items']:.3f}", flush=True)
    ns = argparse.Namespace(batch=8192, epochs=args.epochs, cache=args.cache, lr=0.05,
                            coverage=2.0, planted=args.planted)
    cel = ["embedding.method=cel", "cel.reassign_mode=exact", "cel.items.enabled=true",
           "cel.users.enabled=true", "cel.items.max_clusters=64", "cel.users.max_clusters=64"]
    oracle = ["embedding.method=cel", "cel.init_from_planted=true", "cel.reassign_rule=none",
              "cel.split_until=0", "cel.items.enabled=true", "cel.users.enabled=true"]
    with tempfile.TemporaryDirectory() as run_dir:
        plans = [(name, None, "full", None, ["embedding.method=full"]),
                 (name, None, "oracle", None, [*oracle, f"cel.items.max_clusters={args.planted}",
                                                f"cel.users.max_clusters={args.planted}"])]
        plans += [(name, None, "cel", g, [*cel, f"cel.reassign_min_gain={g}"]) for g in args.min_gains]
        # the k-means-like start: 64 clusters from step 0 (random balanced assignment), no splits
        plans += [(name, None, "cel_random_start", g,
                   [*cel, "cel.items.init_clusters=64", "cel.users.init_clusters=64",
                    f"cel.reassign_min_gain={g}"]) for g in (0, 4)]
        small = "configs/synthetic_small.yaml"
        small_planted = 8
        plans += [("embedded_default", small, "full", None, ["embedding.method=full"]),
                  ("embedded_default", small, "oracle", None,
                   [*oracle, f"cel.items.max_clusters={small_planted}",
                    f"cel.users.max_clusters={small_planted}"])]
        plans += [("embedded_default", small, "cel", g, [f"cel.reassign_min_gain={g}"])
                  for g in args.small_min_gains]
        for dataset, config, method, gain, extra in plans:
            if config is None:
                overrides = base_overrides(args.size, ns, run_dir, f"probe_{method}_{gain}")
            else:
                overrides = [f"run.dir={run_dir}", f"run.name=probe_small_{method}_{gain}",
                             "run.resume=false", "tracking.loggers=[jsonl]",
                             f"data.cache_dir={args.cache}"]
            m = run_one(overrides + extra, args.timeout, config=config)
            rec = {"dataset": dataset, "probe": "trainer", "start": method, "gate": gain,
                   "clusters": 64 if dataset == name and method.startswith("cel") else None,
                   **{k: m.get(k) for k in ("val_rmse", "val_rmse_cold", "purity_users",
                                            "purity_items", "ari_users", "ari_items",
                                            "train_time_s", "reassign_time_s")}}
            records.append(rec)
            print(f"[probe] {dataset} {method} min_gain {gain}: rmse {rec['val_rmse']:.4f} "
                  f"cold {rec['val_rmse_cold']:.4f}", flush=True)
            write_results(args.name, records, size=args.size, planted=args.planted,
                          epochs=args.epochs)
    print_table(records, COLUMNS)


if __name__ == "__main__":
    main()
