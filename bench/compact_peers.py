"""The compact methods (sparse top-k rows, CCE, CERP) against CEL-50 on the ML-100K reference
split, at CEL-50's item-side bytes (11.7x fewer than the full item table; users stay full):

- rating prediction (MF, RMSE): sparse / CCE / CERP with the full model's tuned settings, as
  hash and QR get in bench/quality_ml100k.py, next to CEL-50 (its config) and full, run here;
- retrieval (MF, sampled softmax, recall@20; every rating a positive): the same 4-point grid
  x 24 epochs as bench/retrieval_bench.py gives every method; CEL-50 and full are read from
  bench/results/retrieval.json (same protocol and code path; its commit is recorded).

    python -m bench.compact_peers [--quick]     # writes bench/results/compact_peers.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import tempfile
from concurrent.futures import ThreadPoolExecutor

from bench import retrieval_bench
from bench.common import RESULTS_DIR, print_table, write_results
from bench.quality_ml100k import (BASELINE_SETTINGS, cel_item_bytes, prepared_data,
                                  run_trainer, table_width)

METHODS = ("sparse", "cce", "cerp")
TABLE = ["task", "method", "item_side_bytes", "compression", "lr", "l2", "best_epoch",
         "best_val_rmse", "recall_at_20", "ndcg_at_20", "vs_cel"]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.compact_peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/ml100k")
    parser.add_argument("--src", default="../shared/datasets/ml-100k")
    parser.add_argument("--quick", action="store_true", help="3 epochs, one grid point, no file")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    data, meta = prepared_data(args.data, args.src)
    users, items = meta["num_users"], meta["num_items"]
    row = table_width("mf") * 4
    target = cel_item_bytes("mf", 50, items, entity_bias=True)
    ratio = items * row / target
    print(f"[bench] item side: CEL-50 {target:,} bytes = full / {ratio:.2f}", flush=True)
    item_only = [f"embedding.compression={ratio:.4f}", f"embedding.min_cardinality={users + 1}"]
    epochs = ["train.epochs=3"] if args.quick else []
    records = []
    with tempfile.TemporaryDirectory(prefix="cel_compact_") as tmp:
        work = pathlib.Path(tmp)
        # rating prediction
        rmse_jobs = [("cel", ["cel.items.max_clusters=50"]),
                     ("full", ["embedding.method=full", *BASELINE_SETTINGS["mf"]])]
        rmse_jobs += [(m, [f"embedding.method={m}", *item_only, *BASELINE_SETTINGS["mf"]])
                      for m in METHODS]

        def rmse_one(job):
            method, ov = job
            return job, run_trainer("mf", [*ov, *epochs], data, work, f"rmse_{method}")

        grid = [dict(zip(retrieval_bench.GRID, v)) for v in itertools.product(*retrieval_bench.GRID.values())]
        grid = grid[:1] if args.quick else grid
        rec_epochs = 3 if args.quick else retrieval_bench.EPOCHS

        def rec_one(job):
            method, point = job
            name = f"rec_{method}_lr{point['train.lr']}_l2{point['train.l2']}"
            ov = [f"embedding.method={method}", *item_only, f"train.epochs={rec_epochs}",
                  *(f"{k}={v}" for k, v in point.items())]
            return job, retrieval_bench.run(data, work, name, ov)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            rmse = list(pool.map(rmse_one, rmse_jobs))
            rec = list(pool.map(rec_one, [(m, p) for m in METHODS for p in grid]))
    user_bytes = users * row
    by = {}
    for (method, ov), m in rmse:
        side = target if method == "cel" else (items * row if method == "full"
                                               else m["embedding_bytes"] - user_bytes)
        by[method] = {"task": "rating (RMSE)", "method": method, "item_side_bytes": side,
                      "compression": round(items * row / side, 2), "best_val_rmse": m["best_val_rmse"],
                      "best_epoch": m.get("best_epoch"), "overrides": " ".join(ov)}
    records += list(by.values())
    for r in records:
        r["vs_cel"] = round(r["best_val_rmse"] - by["cel"]["best_val_rmse"], 4)
    prior = json.loads((RESULTS_DIR / "retrieval.json").read_text())
    base = {r["method"]: r for r in prior["records"] if r["method"] in ("cel", "full")}
    cel_recall = base["cel"]["recall_at_20"]
    for method in ("cel", "full"):
        r = base[method]
        records.append({"task": "retrieval (recall@20)", "method": method,
                        "item_side_bytes": r["item_side_bytes"], "compression": r["compression"],
                        "lr": r["lr"], "l2": r["l2"], "best_epoch": r["best_epoch"],
                        "recall_at_20": r["recall_at_20"], "ndcg_at_20": r["ndcg_at_20"],
                        "source": f"bench/results/retrieval.json (commit {prior['commit']})"})
    tuning = []
    for method in METHODS:
        mine = [(p, m) for (mm, p), m in rec if mm == method]
        tuning += [{"method": method, **p, "best_val_recall_at_20": m.get("best_val_recall_at_20")}
                   for p, m in mine]
        point, best = max(mine, key=lambda pm: pm[1].get("best_val_recall_at_20") or -1)
        side = best["embedding_bytes"] - user_bytes
        records.append({"task": "retrieval (recall@20)", "method": method, "item_side_bytes": side,
                        "compression": round(items * row / side, 2), "lr": point["train.lr"],
                        "l2": point["train.l2"], "best_epoch": best.get("best_epoch"),
                        "recall_at_20": best["best"]["recall_at_20"],
                        "ndcg_at_20": best["best"]["ndcg_at_20"]})
    for r in records:
        if r["task"].startswith("retrieval"):
            r["vs_cel"] = round(r["recall_at_20"] - cel_recall, 4)
    print()
    print_table(records, TABLE)
    if not args.quick:
        path = write_results("compact_peers", records, dataset="ml100k-reference",
                             item_side_bytes="the run's embedding_bytes minus the full user table "
                                             "(CEL: cluster rows + int32 map + per-item bias)",
                             rating_settings=BASELINE_SETTINGS["mf"], retrieval_grid=retrieval_bench.GRID,
                             retrieval_epochs=rec_epochs, tuning=tuning)
        print(f"[bench] wrote {path}")
    return records


if __name__ == "__main__":
    main()
