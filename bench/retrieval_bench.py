"""Retrieval on MovieLens-100K as implicit feedback: every rating a positive, the CEL reference
split (80,000 / 19,999 ratings, seed 0), MF trained with in-batch sampled softmax
(`train.loss=softmax`, logQ-corrected) and ranked over the full catalogue with training items
excluded: recall@K and NDCG@K on validation, overall and for cold items / cold users.

Methods at equal item-side bytes: CEL with 50 item clusters (cluster rows + int32 map + a float32
bias per item, configs/ml100k_mf.yaml), hash and QR tables matched to CEL-50's bytes, and the full
table. Every method runs the same grid (`GRID`, 24 epochs) and is reported at its best grid
point and epoch by validation recall@20 (the reference protocol's "best epoch on validation").
Users are unclustered full tables in every run.

    python -m bench.retrieval_bench            # writes bench/results/retrieval.json
    python -m bench.retrieval_bench --quick    # 1 grid point, 3 epochs, no results file
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import print_table, write_results
from bench.quality_ml100k import (ROOT, cel_item_bytes, hash_buckets_for, prepared_data,
                                  qr_collisions_for, table_width)

CONFIG = "configs/ml100k_mf.yaml"
GRID = {"train.lr": [0.01, 0.02], "train.l2": [0.02, 0.08]}
EPOCHS = 24
LOSS = "softmax"
METRICS = ["recall_at_10", "recall_at_20", "ndcg_at_20", "recall_at_50", "recall_at_20_cold_items",
           "ndcg_at_20_cold_items", "recall_at_20_cold_users"]
TABLE = ["method", "item_clusters", "item_side_bytes", "compression", "lr", "l2", "best_epoch",
         "recall_at_20", "ndcg_at_20", "recall_at_10", "recall_at_50", "recall_at_20_cold_items",
         "recall_at_20_cold_users", "vs_full_recall_at_20", "train_time_s"]


def plan(num_items: int) -> list[tuple[str, int | None, int, list[str]]]:
    """(method, item clusters, item-side bytes, overrides)."""
    target = cel_item_bytes("mf", 50, num_items, entity_bias=True)
    buckets, hash_bytes = hash_buckets_for(target, "mf")
    m, qr_bytes = qr_collisions_for(target, "mf", num_items)
    print(f"[bench] item-side bytes: CEL-50 {target:,}  hash B={buckets} -> {hash_bytes:,}  "
          f"QR m={m} -> {qr_bytes:,}  full {num_items * table_width('mf') * 4:,}", flush=True)
    return [("cel", 50, target, ["cel.items.max_clusters=50"]),
            ("full", None, num_items * table_width("mf") * 4, ["embedding.method=full"]),
            ("hash", None, hash_bytes, ["embedding.method=hash",
                                        f"embedding.hash_buckets.items={buckets}"]),
            ("qr", None, qr_bytes, ["embedding.method=qr", f"embedding.qr_collisions.items={m}"])]


def run(data: pathlib.Path, workdir: pathlib.Path, name: str, overrides: list[str]) -> dict:
    """One training subprocess; its metrics.json (best epoch by validation recall@20)."""
    cmd = [sys.executable, "-m", "trainer.main", "--config", CONFIG, f"data.path={data}",
           f"run.dir={workdir}", f"run.name={name}", "tracking.loggers=[jsonl]",
           "tracking.progress=false", "run.resume=false", f"train.loss={LOSS}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((workdir / name / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - t0
    evals = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("val_recall_at_20") is not None]
    best = max(evals, key=lambda e: e["val_recall_at_20"])
    metrics["best"] = {k: best.get(f"val_{k}") for k in METRICS}
    return metrics


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.retrieval_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/ml100k")
    parser.add_argument("--src", default="../shared/datasets/ml-100k")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs")
    parser.add_argument("--results", default=None, help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    data, meta = prepared_data(args.data, args.src)
    num_items = meta["num_items"]
    dataset = ("ml100k-implicit-reference" if data == ROOT / "data/ml100k"
               else f"{data.name}-implicit")
    grid = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    epochs = EPOCHS
    if args.quick:
        grid, epochs = grid[:1], 3
    methods = plan(num_items)
    jobs = [(m, k, b, ov, point) for m, k, b, ov in methods for point in grid]
    with tempfile.TemporaryDirectory(prefix="cel_retrieval_") as tmp:
        def one(job):
            method, k, item_bytes, ov, point = job
            name = f"{method}_lr{point['train.lr']}_l2{point['train.l2']}"
            extra = [*ov, *(f"{key}={v}" for key, v in point.items()), f"train.epochs={epochs}"]
            metrics = run(data, pathlib.Path(tmp), name, extra)
            print(f"[bench] {name}: best recall@20 {metrics.get('best_val_recall_at_20'):.4f} "
                  f"(epoch {metrics.get('best_epoch')}, wall {metrics['wall_s']:.0f}s)", flush=True)
            return job, metrics
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(one, jobs))
    records, tuning = [], []
    full_bytes = num_items * table_width("mf") * 4
    for method, k, item_bytes, _ov in methods:
        mine = [(job[4], m) for job, m in results if job[0] == method]
        for point, m in mine:
            tuning.append({"method": method, "lr": point["train.lr"], "l2": point["train.l2"],
                           "best_val_recall_at_20": m.get("best_val_recall_at_20"),
                           "best_epoch": m.get("best_epoch")})
        point, best = max(mine, key=lambda pm: pm[1].get("best_val_recall_at_20") or -1)
        hist = best["best"]
        rec = {"dataset": dataset, "method": method, "model": "mf",
               "loss": LOSS, "item_clusters": k, "item_side_bytes": item_bytes,
               "embedding_bytes": best.get("embedding_bytes"),
               "compression": round(full_bytes / item_bytes, 2),
               "lr": point["train.lr"], "l2": point["train.l2"], "best_epoch": best.get("best_epoch"),
               **{k2: hist.get(k2) for k2 in METRICS},
               "final_recall_at_20": best.get("val_recall_at_20"),
               "train_time_s": best.get("train_time_s"),
               "reassign_time_s": best.get("reassign_time_s")}
        records.append(rec)
    full = next(r for r in records if r["method"] == "full")
    for rec in records:
        rec["vs_full_recall_at_20"] = round(rec["recall_at_20"] / full["recall_at_20"], 4)
    print()
    print_table(records, TABLE)
    if not args.quick or args.results:
        path = write_results(
            "retrieval", records, directory=args.results, selection="best grid point and epoch "
            "by validation recall@20", grid=GRID, epochs=epochs, config=CONFIG,
            split="reference (80,000 / 19,999 ratings, seed 0), every rating a positive",
            metrics="recall@K = hits / min(K, positives), NDCG@K binary gains, over the full "
                    "catalogue with training items excluded, averaged over users with a positive",
            item_side_bytes="CEL: cluster rows + int32 map + per-item bias; hash/QR matched to "
                            "CEL-50's", tuning=tuning)
        print(f"[bench] wrote {path}")
    return records


if __name__ == "__main__":
    main()
