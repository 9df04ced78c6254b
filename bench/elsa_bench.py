"""ELSA (trainer.elsa) on MovieLens-100K as implicit feedback, with dense, CEL, sparse, hash and
QR item embeddings: every rating a positive, the CEL reference split (80,000 / 19,999 ratings,
seed 0; the same data directory as bench/retrieval_bench.py), ranked over the full catalogue
with training items excluded (trainer.retrieval.RankingEvaluator): recall@K / NDCG@K on
validation.

The full table against the compressed methods at about 10x fewer item-side bytes
(`embedding.compression=10`, sized by trainer.builders: CEL's cluster rows after its int32 map,
sparse's top-k values + column indices per row, hash buckets, QR's two tables). Every method
runs the same grid (`GRID`, `EPOCHS` epochs, d = `DIM`) and is reported at its best grid point
and epoch by validation recall@20 (there is no separate test split: the reference protocol's
"best epoch on validation", as in bench/retrieval_bench.py).

    python -m bench.elsa_bench            # writes bench/results/elsa.json
    python -m bench.elsa_bench --quick    # 1 grid point, 2 epochs, no results file
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import print_table, write_results
from bench.quality_ml100k import ROOT, prepared_data

DIM = 64
EPOCHS = 24
GRID = {"lr": [0.01, 0.03, 0.1]}
COMPRESSION = 10.0
BATCH_USERS = 128
METHODS = ["full", "cel", "sparse", "hash", "qr"]
METRICS = ["recall_at_10", "recall_at_20", "ndcg_at_20", "recall_at_50", "recall_at_20_cold_items",
           "recall_at_20_cold_users"]
TABLE = ["method", "item_clusters", "item_side_bytes", "compression", "lr", "best_epoch",
         "recall_at_20", "ndcg_at_20", "recall_at_10", "recall_at_50", "recall_at_20_cold_users",
         "vs_full_recall_at_20", "train_time_s", "reassign_time_s"]


def run(data: pathlib.Path, workdir: pathlib.Path, name: str, args: list[str]) -> dict:
    """One `python -m trainer.elsa` subprocess; its metrics.json."""
    out = workdir / name
    cmd = [sys.executable, "-m", "trainer.elsa", "--data", str(data), "--out", str(out), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - t0
    return metrics


def available_methods() -> list[str]:
    """`METHODS` that this checkout's trainer.config accepts (sparse arrived later)."""
    import typing

    from trainer.config import EmbeddingConfig
    allowed = typing.get_args(typing.get_type_hints(EmbeddingConfig)["method"])
    return [m for m in METHODS if m in allowed]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.elsa_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/ml100k")
    parser.add_argument("--src", default="../shared/datasets/ml-100k")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs")
    parser.add_argument("--results", default=None, help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    data, meta = prepared_data(args.data, args.src)
    num_items = meta["num_items"]
    dataset = ("ml100k-implicit-reference" if data == ROOT / "data/ml100k"
               else f"{data.name}-implicit")
    grid, epochs = GRID["lr"], EPOCHS
    if args.quick:
        grid, epochs = grid[1:2], 2
    methods = available_methods()
    missing = [m for m in METHODS if m not in methods]
    if missing:
        print(f"[bench] not in this checkout's embedding.method: {missing}", flush=True)
    jobs = [(m, lr) for m in methods for lr in grid]
    common = ["--dim", str(args.dim), "--epochs", str(epochs), "--batch-users", str(BATCH_USERS)]
    with tempfile.TemporaryDirectory(prefix="cel_elsa_") as tmp:
        def one(job):
            method, lr = job
            extra = [*common, "--method", method, "--lr", str(lr)]
            if method != "full":
                extra += ["--compression", str(COMPRESSION)]
            name = f"{method}_lr{lr}"
            metrics = run(data, pathlib.Path(tmp), name, extra)
            print(f"[bench] {name}: best recall@20 {metrics['best_val_recall_at_20']:.4f} "
                  f"(epoch {metrics['best_epoch']}, wall {metrics['wall_s']:.0f}s)", flush=True)
            return job, metrics
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            # the slow CEL runs first, so the pool's two workers finish together
            order = sorted(jobs, key=lambda j: j[0] != "cel")
            results = list(pool.map(one, order))
    full_bytes = num_items * args.dim * 4
    records, tuning = [], []
    for method in methods:
        mine = [(job[1], m) for job, m in results if job[0] == method]
        for lr, m in mine:
            tuning.append({"method": method, "lr": lr,
                           "best_val_recall_at_20": m["best_val_recall_at_20"],
                           "best_epoch": m["best_epoch"]})
        lr, best = max(mine, key=lambda lm: lm[1]["best_val_recall_at_20"] or -1)
        records.append({
            "dataset": dataset, "method": method, "model": "elsa", "dim": args.dim,
            "item_clusters": best.get("num_clusters_items"),
            "item_side_bytes": best["item_side_bytes"],
            "embedding_bytes": best["embedding_bytes"],
            "compression": round(full_bytes / best["item_side_bytes"], 2),
            "lr": lr, "best_epoch": best["best_epoch"],
            **{k: best.get(f"best_val_{k}") for k in METRICS},
            "final_recall_at_20": best.get("val_recall_at_20"),
            "train_time_s": best.get("train_time_s"), "time_to_best_s": best.get("time_to_best_s"),
            "reassign_time_s": best.get("reassign_time_s")})
    full = next((r for r in records if r["method"] == "full"), None)
    for rec in records:
        rec["vs_full_recall_at_20"] = (round(rec["recall_at_20"] / full["recall_at_20"], 4)
                                       if full and full["recall_at_20"] else None)
    print()
    print_table(records, TABLE)
    if not args.quick or args.results:
        path = write_results(
            "elsa", records, directory=args.results,
            selection="best grid point and epoch by validation recall@20", grid=GRID,
            epochs=epochs, dim=args.dim, batch_users=BATCH_USERS, optimizer="adamw",
            compression_target=COMPRESSION, methods_missing=missing,
            split="reference (80,000 / 19,999 ratings, seed 0), every rating a positive",
            metrics="recall@K = hits / min(K, positives), NDCG@K binary gains, over the full "
                    "catalogue with training items excluded, averaged over users with a positive",
            item_side_bytes="embedding_bytes less the unused 1-row user table; full = items x "
                            "dim x 4; the others sized by embedding.compression",
            cel="splits every 2 steps (every splittable cluster), exact reassignment once per "
                "epoch scored by the coordinate-wise ELSA loss (trainer.elsa), 2 uniform "
                "negatives per positive", tuning=tuning)
        print(f"[bench] wrote {path}")
    return records


if __name__ == "__main__":
    main()
