"""Quality on MovieLens-100K (the CEL reference split): CEL at several item-cluster budgets, CEL
with users clustered too, the full-embedding model, hashing and quotient-remainder at the item-side
bytes of CEL-50, for MF and NeuMF.

    python -m bench.quality_ml100k [--data data/ml100k] [--src ../shared/datasets/ml-100k]
                                   [--quick] [--tune] [--fused] [--lite]
                                   [--models mf,neumf]

Every run is a fresh `python -m trainer.main --config configs/ml100k_<model>.yaml ...` subprocess;
its RUN_DIR/metrics.json (and the per-epoch metrics.jsonl) are read back. Settings: the configs
hold CEL's tuned settings; the full / hash / QR runs use the full model's tuned settings
(`BASELINE_SETTINGS` below). Both were chosen by the same grid (`--tune`, results in
bench/results/quality_ml100k_tuning.json), on the validation split (the only held-out set of the
reference protocol): "best epoch on validation". Writes bench/results/quality_ml100k.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from bench.common import print_table, write_results

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = {"mf": "configs/ml100k_mf.yaml", "neumf": "configs/ml100k_neumf.yaml"}

# Full-embedding (and hash / QR) settings per model, chosen by `--tune` with the same grid as CEL.
BASELINE_SETTINGS = {   # full MF's best grid point (lr 0.005, l2 0.12: 0.9212 at epoch 13 of 16)
    "mf": ["train.lr=0.005", "train.l2=0.12", "train.epochs=16"],
    "neumf": ["train.lr=0.005", "train.l2=0.12", "train.epochs=16"],   # not tuned separately
}
# The tuning grid (identical for CEL-50 and for the full model; epochs = best epoch of the run).
TUNE_GRID = {"train.lr": [0.005, 0.01], "train.l2": [0.05, 0.08, 0.12]}
TUNE_EPOCHS = 16

RECORD_KEYS = ["dataset", "method", "model", "item_clusters", "user_clusters", "embedding_bytes",
               "item_side_bytes", "val_rmse", "best_val_rmse", "val_rmse_cold",
               "best_val_rmse_cold", "val_rmse_warm", "train_time_s", "time_to_best_s",
               "best_epoch", "epochs"]
TABLE_COLUMNS = ["model", "method", "item_clusters", "user_clusters", "embedding_bytes",
                 "item_side_bytes", "best_val_rmse", "val_rmse", "best_val_rmse_cold",
                 "val_rmse_warm", "time_to_best_s", "train_time_s"]


# ----------------------------------------------------------------------------- helpers
def ensure_data(data: pathlib.Path, src: pathlib.Path) -> None:
    if (data / "meta.json").exists():
        return
    print(f"[bench] preparing {data} from {src}", flush=True)
    subprocess.run([sys.executable, "-m", "data_pipeline", "prepare", "movielens", "--src", str(src),
                    "--out", str(data), "--overwrite"], check=True, cwd=ROOT)


def prepared_data(data: str | pathlib.Path, src: str | pathlib.Path) -> tuple[pathlib.Path, dict]:
    """`--data` made absolute (relative to the repository), prepared from `--src` if it is not
    there yet, and its meta.json."""
    path = pathlib.Path(data)
    path = path if path.is_absolute() else ROOT / path
    ensure_data(path, pathlib.Path(src))
    return path, json.loads((path / "meta.json").read_text())


def table_width(model: str, d: int = 32) -> int:
    """Width of the embedding rows (trainer.models.embedding_dim_for): MF d+1 rounded up to 4."""
    return -(-(d + 1) // 4) * 4 if model == "mf" else d


def cel_item_bytes(model: str, clusters: int, num_items: int, entity_bias: bool, d: int = 32) -> int:
    """Item side of CEL: cluster rows + int32 map (+ a float32 per-item bias)."""
    return (clusters * table_width(model, d) * 4 + num_items * 4
            + (num_items * 4 if entity_bias else 0))


def hash_buckets_for(target: int, model: str) -> tuple[int, int]:
    row = table_width(model) * 4
    b = max(1, round(target / row))
    return b, b * row


def qr_collisions_for(target: int, model: str, num_items: int) -> tuple[int, int]:
    row = table_width(model) * 4
    best = min(range(1, num_items + 1),
               key=lambda m: abs((math.ceil(num_items / m) + min(m, num_items)) * row - target))
    return best, (math.ceil(num_items / best) + min(best, num_items)) * row


def config_has_entity_bias(model: str) -> bool:
    import yaml
    cfg = yaml.safe_load((ROOT / CONFIGS[model]).read_text())
    return bool(((cfg.get("cel") or {}).get("items") or {}).get("entity_bias", False))


def run_trainer(model: str, overrides: list[str], data: pathlib.Path, workdir: pathlib.Path,
                name: str, env: dict | None = None) -> dict:
    """One fresh training subprocess; returns its metrics.json plus the per-epoch history."""
    cmd = [sys.executable, "-m", "trainer.main", "--config", CONFIGS[model],
           f"data.path={data}", f"run.dir={workdir}", f"run.name={name}",
           "tracking.loggers=[jsonl]", "run.resume=false", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          # one intra-op thread: these ops are tiny, and on a shared 2-core
                          # machine OpenMP's spinning threads made steps ~10x slower
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run_dir = workdir / name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = []
    jsonl = run_dir / "metrics.jsonl"
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            row = json.loads(line)
            if "val_rmse" in row:
                history.append({k: row.get(k) for k in ("epoch", "val_rmse", "val_rmse_cold",
                                                         "train_time_s")})
    metrics["wall_s"] = time.perf_counter() - t0
    metrics["history"] = history
    return metrics


def record(model: str, method: str, metrics: dict, item_clusters, user_clusters,
           item_side_bytes: int | None, overrides: list[str]) -> dict:
    rec = {"dataset": "ml100k-reference", "method": method, "model": model,
           "item_clusters": item_clusters, "user_clusters": user_clusters,
           "item_side_bytes": item_side_bytes}
    for k in RECORD_KEYS:
        if k not in rec:
            rec[k] = metrics.get(k)
    rec["overrides"] = " ".join(overrides)
    return rec


# ----------------------------------------------------------------------------- the benchmark
def plan_runs(model: str, num_items: int, quick: bool) -> list[tuple]:
    """(method, item_clusters, user_clusters, item_side_bytes, overrides) for one model."""
    bias = config_has_entity_bias(model)
    target = cel_item_bytes(model, 50, num_items, bias)
    buckets, hash_bytes = hash_buckets_for(target, model)
    m, qr_bytes = qr_collisions_for(target, model, num_items)
    print(f"[bench] {model}: item-side bytes CEL-50 {target:,}  hash B={buckets} -> {hash_bytes:,}  "
          f"QR m={m} -> {qr_bytes:,}", flush=True)
    base = BASELINE_SETTINGS[model]
    runs = []
    for k in ([50] if quick else [10, 50, 200]):
        runs.append(("cel", k, None, cel_item_bytes(model, k, num_items, bias),
                     [f"cel.items.max_clusters={k}"]))
    if not quick:
        runs.append(("cel", 50, 100, target, ["cel.items.max_clusters=50",
                                              "cel.users.enabled=true", "cel.users.max_clusters=100"]))
    runs.append(("full", None, None, num_items * table_width(model) * 4,
                 ["embedding.method=full", *base]))
    runs.append(("hash", None, None, hash_bytes,
                 ["embedding.method=hash", f"embedding.hash_buckets.items={buckets}", *base]))
    runs.append(("qr", None, None, qr_bytes,
                 ["embedding.method=qr", f"embedding.qr_collisions.items={m}", *base]))
    return runs


def main_bench(args, data: pathlib.Path, num_items: int) -> None:
    records = []
    with tempfile.TemporaryDirectory(prefix="cel_quality_") as tmp:
        for model in args.models:
            for i, (method, k, ku, item_bytes, ov) in enumerate(plan_runs(model, num_items, args.quick)):
                if args.quick:
                    ov = [*ov, "train.epochs=3"]
                name = f"{model}_{method}_{k}_{ku}"
                metrics = run_trainer(model, ov, data, pathlib.Path(tmp), name)
                rec = record(model, method, metrics, k, ku, item_bytes, ov)
                records.append(rec)
                print(f"[bench] {name}: best {rec['best_val_rmse']:.4f} final {rec['val_rmse']:.4f} "
                      f"cold {rec['val_rmse_cold']:.4f} time-to-best {rec['time_to_best_s']:.1f}s "
                      f"(wall {metrics['wall_s']:.0f}s)", flush=True)
    print()
    print_table(records, TABLE_COLUMNS)
    if not args.quick:
        path = write_results("quality_ml100k", records, selection="best epoch on validation",
                             tuned_on="validation", split="reference (80,000 / 19,999, seed 0)",
                             item_side_bytes="CEL: cluster rows + int32 map (+ per-item bias); "
                                             "hash/QR matched to CEL-50's",
                             baseline_settings=BASELINE_SETTINGS,
                             configs={m: (ROOT / CONFIGS[m]).read_text() for m in args.models})
        print(f"[bench] wrote {path}")


def main_tune(args, data: pathlib.Path) -> None:
    """The same grid for CEL-50 (the config's other settings) and for the full model."""
    keys = list(TUNE_GRID)
    jobs = [(model, method, values) for model in args.models for method in ("cel", "full")
            for values in itertools.product(*(TUNE_GRID[k] for k in keys))]
    # parallel runs get one thread each (timings then only indicative; RMSE is unaffected)
    env = {"OMP_NUM_THREADS": "1"} if args.jobs > 1 else None

    def one(job, tmp):
        model, method, values = job
        ov = [f"{k}={v}" for k, v in zip(keys, values)] + [f"train.epochs={TUNE_EPOCHS}"]
        if method == "full":
            ov.append("embedding.method=full")
        name = f"{model}_{method}_" + "_".join(str(v) for v in values)
        return job, name, run_trainer(model, ov, data, pathlib.Path(tmp), name, env)

    records = []
    from concurrent.futures import ThreadPoolExecutor
    with tempfile.TemporaryDirectory(prefix="cel_tune_") as tmp, \
            ThreadPoolExecutor(args.jobs) as pool:
        for (model, method, values), name, metrics in pool.map(lambda j: one(j, tmp), jobs):
            rec = {"dataset": "ml100k-reference", "method": method, "model": model,
                   **dict(zip(keys, values)), "epochs": TUNE_EPOCHS,
                   **{k: metrics.get(k) for k in ("best_val_rmse", "best_epoch",
                                                  "time_to_best_s", "val_rmse",
                                                  "best_val_rmse_cold", "train_time_s")},
                   "history": metrics["history"]}
            records.append(rec)
            print(f"[tune] {name}: best {rec['best_val_rmse']:.4f} @ epoch "
                  f"{rec['best_epoch']} ({rec['time_to_best_s']:.1f}s)", flush=True)
    print_table(records, ["model", "method", *keys, "best_val_rmse", "best_epoch",
                          "time_to_best_s", "best_val_rmse_cold"])
    path = write_results("quality_ml100k_tuning", records, selection="best epoch on validation",
                         tuned_on="validation", grid={**TUNE_GRID, "epochs": TUNE_EPOCHS})
    print(f"[bench] wrote {path}")


# Fused vs torch-optimizer tables: the same runs (Adagrad, the one kind fused on CPU; no per-item
# bias, which the sharded collection lacks), once on FBGEMM's fused TBE and once on torch's
# optimizer over nn.EmbeddingBag tables, so the kernels are the only difference.
FUSED_SETTINGS = ["train.optimizer=adagrad", "train.lr=0.05", "train.l2=0.08", "train.epochs=16",
                  "cel.items.entity_bias=false", "cel.items.unseen_policy=pooled"]


def main_fused(args, data: pathlib.Path) -> None:
    records = []
    with tempfile.TemporaryDirectory(prefix="cel_fused_") as tmp:
        for model in args.models:
            for method, extra in (("cel", ["cel.items.max_clusters=50"]),
                                  ("full", ["embedding.method=full"])):
                for fused in ("on", "off"):
                    ov = [*FUSED_SETTINGS, *extra, f"train.fused_tables={fused}"]
                    name = f"{model}_{method}_fused_{fused}"
                    metrics = run_trainer(model, ov, data, pathlib.Path(tmp), name)
                    rec = record(model, method, metrics, 50 if method == "cel" else None, None,
                                 None, ov)
                    rec["fused_tables"] = fused
                    records.append(rec)
                    print(f"[fused] {name}: best {rec['best_val_rmse']:.4f} final "
                          f"{rec['val_rmse']:.4f} train {rec['train_time_s']:.1f}s", flush=True)
    print_table(records, ["model", "method", "fused_tables", "best_val_rmse", "val_rmse",
                          "best_val_rmse_cold", "best_epoch", "train_time_s"])
    path = write_results("quality_ml100k_fused", records, selection="best epoch on validation",
                         settings=FUSED_SETTINGS)
    print(f"[bench] wrote {path}")


def main_lite(args, data: pathlib.Path) -> None:
    """CEL-50 with exact reassignment (the configs' default at this size) and with CEL-Lite
    (`cel.reassign_mode=lite`, the default above 2^25 entities x clusters), side by side."""
    records = []
    with tempfile.TemporaryDirectory(prefix="cel_lite_") as tmp:
        for model in args.models:
            # Lite's linearised scoring equals its exact scoring for MF (linear in the entity;
            # tests/phases/test_lite_joint.py), so it runs for the other models only
            runs = [("exact", None), ("lite", "exact")] + ([] if model == "mf" else [("lite", "linearised")])
            for mode, scoring in runs:
                ov = ["cel.items.max_clusters=50", f"cel.reassign_mode={mode}"]
                if scoring:
                    ov.append(f"cel.lite_scoring={scoring}")
                name = f"{model}_cel50_{mode}" + (f"_{scoring}" if scoring else "")
                metrics = run_trainer(model, ov, data, pathlib.Path(tmp), name)
                rec = record(model, "cel", metrics, 50, None, None, ov)
                rec["reassign_mode"] = mode
                rec["lite_scoring"] = scoring
                rec["reassign_time_s"] = metrics.get("reassign_time_s")
                records.append(rec)
                print(f"[lite] {name}: best {rec['best_val_rmse']:.4f} final {rec['val_rmse']:.4f} "
                      f"train {rec['train_time_s']:.1f}s", flush=True)
    print_table(records, ["model", "reassign_mode", "lite_scoring", "best_val_rmse", "val_rmse",
                          "best_val_rmse_cold", "best_epoch", "reassign_time_s", "train_time_s"])
    path = write_results("quality_ml100k_lite", records, selection="best epoch on validation")
    print(f"[bench] wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quality_ml100k", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/ml100k")
    parser.add_argument("--src", default="../shared/datasets/ml-100k")
    parser.add_argument("--quick", action="store_true", help="CEL-50 and baselines, 3 epochs, "
                        "no results file (a smoke test)")
    parser.add_argument("--tune", action="store_true", help="run the tuning grid instead")
    parser.add_argument("--fused", action="store_true", help="fused vs torch-optimizer tables, "
                        "same runs (writes quality_ml100k_fused.json)")
    parser.add_argument("--lite", action="store_true", help="CEL-50 with exact vs CEL-Lite "
                        "reassignment (writes quality_ml100k_lite.json)")
    parser.add_argument("--models", default="mf,neumf")
    parser.add_argument("--jobs", type=int, default=1, help="parallel runs (tuning only)")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    data = pathlib.Path(args.data)
    if not data.is_absolute():
        data = ROOT / data
    ensure_data(data, pathlib.Path(args.src))
    num_items = json.loads((data / "meta.json").read_text())["num_items"]
    if args.tune:
        main_tune(args, data)
    elif args.fused:
        main_fused(args, data)
    elif args.lite:
        main_lite(args, data)
    else:
        main_bench(args, data, num_items)


if __name__ == "__main__":
    main()
