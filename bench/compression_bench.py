"""Embedding compression on MovieLens, the CCE paper's protocol (Tsang & Ahle, "Clustering the
Sketch"): GMF (dot product + global bias, sigmoid, BCE) over 32-d user and item tables; rating 3
dropped, click = rating >= 4, ids compacted after dropping, each user's last 2 interactions by
timestamp held out as validation (`prepare movielens --drop-ratings 3 --label-kind click
--click-threshold 4 --split leave-last --k 2`); metric: validation AUC at the best epoch.

    python -m bench.compression_bench                     # ML-100K, writes bench/results/compression.json
    python -m bench.compression_bench --src ml-1m/ratings.dat --data data/ml-1m_cce
    python -m bench.compression_bench --methods cel,full --budgets 4x,16x
    python -m bench.compression_bench --quick             # 1 grid point, 3 epochs, no results file

Budgets: `Nx` is N times fewer bytes than the full tables (`embedding.compression=N`, every table
compressed, `embedding.min_cardinality=1`; each method sized by its own byte rule: CEL counts its
int32 map, so it cannot reach N >= 32 at d = 32; `cel-narrow`, CEL with
`cel.items.map_dtype=auto`, counts an int8 / int16 map); a plain number `B` is the paper's B parameters
per dimension per table, matched in total (`embedding.compression = (users + items) / (2 B)`:
the same total parameter count as two B-row tables, split between the tables in proportion to
their rows; skipped where it does not compress). Default: 4x, 16x, 64x, plus 256, 1024, 4096
when the tables hold more than 2 x 4,096 rows (ML-1M and larger). Each record's `compression` is
measured: full bytes / the run's embedding_bytes.

Tuning, the same for every (method, budget): the grid `GRID` (learning rate x the l2 penalty on
the looked-up embeddings) at seed 0, Adam, `EPOCHS` epochs, each point scored by its best epoch's
validation AUC; the best point is then run at seeds 1 and 2 too (init, shuffling, CEL's phases;
the split is fixed). Reported: mean, std (ddof 1), min and max over the seeds of the best-epoch
validation AUC. The protocol has only a validation split, so the AUC is chosen on the split it
is reported on, like the paper's. CEL: the CTR bench's schedule (`CEL_SETTINGS`); the cluster
budget of every table comes from the same `embedding.compression`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import print_table, write_results

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The default of --methods: every `embedding.method` that `embedding.compression` sizes
METHODS = "cel,full,hash,qr,cce,cerp,sparse"
# --methods names beyond embedding.method: CEL with its maps as narrow as its clusters allow
VARIANTS = {"cel-narrow": ["embedding.method=cel", "cel.items.map_dtype=auto"]}
RATIO_BUDGETS = ("4x", "16x", "64x")
ROW_BUDGETS = ("256", "1024", "4096")
LARGE_ROWS = 2 * 4096          # users + items above which the row budgets run by default
GRID = {"train.lr": [0.002, 0.005, 0.01], "train.l2": [0.0, 0.01, 0.03]}
QUICK_POINT = {"train.lr": 0.01, "train.l2": 0.01}
EPOCHS = 20
SEEDS = 3
DIM = 32
PROTOCOL = ["--drop-ratings", "3", "--label-kind", "click", "--click-threshold", "4",
            "--split", "leave-last", "--k", "2"]
COMMON = ["data.kind=path", "model.name=gmf", f"model.embedding_dim={DIM}", "train.loss=bce",
          "train.optimizer=adam", "embedding.min_cardinality=1"]
# CEL's schedule as in the CTR bench (configs/ctr_small.yaml): splits double the clusters of a
# table until its budget, a split window closing when its members were seen twice on average;
# one reassignment per epoch (exact: GMF is linear in each row). Passed to every run (the
# baselines ignore cel.*).
CEL_SETTINGS = ["cel.items.splits_per_event=0", "cel.split_coverage=2", "cel.split_until=100000",
                "cel.reassign_rule=every", "cel.reassign_per_epoch=1"]
TABLE = ["method", "budget", "target_compression", "compression", "embedding_bytes", "auc",
         "auc_std", "auc_min", "auc_max", "auc_minus_full", "lr", "l2", "best_epochs",
         "train_time_s"]


# ----------------------------------------------------------------------------- data
def source_name(src: pathlib.Path) -> str:
    """ml-100k for ../shared/datasets/ml-100k or .../ml-1m/ratings.dat."""
    from data_pipeline.sources.movielens import detect
    return detect(src).parent.name


def protocol_ok(data: pathlib.Path) -> bool:
    meta_path = data / "meta.json"
    if not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text())
    extra = meta.get("extra") or {}
    return (meta.get("label_kind") == "click" and extra.get("drop_ratings") == [3.0]
            and extra.get("click_threshold") == 4.0
            and meta.get("split") == {"method": "leave-last", "k": 2})


def ensure_data(data: pathlib.Path, src: pathlib.Path) -> dict:
    """The prepared protocol dataset at `data` (prepared from `src` unless it is there); its meta."""
    if not protocol_ok(data):
        print(f"[bench] preparing {data} from {src} ({' '.join(PROTOCOL)})", flush=True)
        subprocess.run([sys.executable, "-m", "data_pipeline", "prepare", "movielens", "--src",
                        str(src), "--out", str(data), *PROTOCOL, "--overwrite"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((data / "meta.json").read_text())


# ----------------------------------------------------------------------------- plan
def parse_budget(text: str, num_users: int, num_items: int) -> dict:
    """'16x' -> ratio 16; '256' -> the ratio giving two 256-row tables' parameters in total."""
    text = text.strip()
    if text.endswith("x"):
        return {"budget": text, "target_compression": float(text[:-1]), "budget_rows_per_table": None}
    rows = int(text)
    return {"budget": text, "target_compression": (num_users + num_items) / (2 * rows),
            "budget_rows_per_table": rows}


def default_budgets(num_users: int, num_items: int) -> list[str]:
    large = num_users + num_items > LARGE_ROWS
    return [*RATIO_BUDGETS, *(ROW_BUDGETS if large else ())]


def _method_overrides(method: str) -> list[str]:
    return list(VARIANTS.get(method, [f"embedding.method={method}"]))


def reach(method: str, ratio: float, num_users: int, num_items: int) -> str | None:
    """None if the trainer can size `method` at `ratio`, else why not (the builder's own rule)."""
    from trainer.builders import compressed_rows, table_specs
    from trainer.config import load_config
    from trainer.models import embedding_dim_for
    cfg = load_config(None, [*COMMON, *_method_overrides(method), f"embedding.compression={ratio}"])
    try:
        compressed_rows(cfg, table_specs(cfg, num_users, num_items), embedding_dim_for(cfg.model))
    except ValueError as exc:
        return str(exc)
    return None


def plan(methods: list[str], budgets: list[str], num_users: int, num_items: int
         ) -> tuple[list[dict], list[dict]]:
    """(configs to run, budgets left out with the reason): one config per (method, budget);
    full once, without a budget."""
    from trainer.config import load_config
    configs, left_out = [], []
    parsed = [parse_budget(b, num_users, num_items) for b in budgets]
    for method in methods:
        load_config(None, _method_overrides(method))        # ConfigError: a method it lacks
        if method == "full":
            configs.append({"method": "full", "budget": "full", "target_compression": None,
                            "budget_rows_per_table": None, "overrides": ["embedding.method=full"]})
            continue
        for b in parsed:
            ratio = b["target_compression"]
            if ratio <= 1:
                left_out.append({"method": method, "budget": b["budget"],
                                 "reason": f"does not compress (ratio {ratio:.3g})"})
                continue
            why = reach(method, ratio, num_users, num_items)
            if why is not None:
                left_out.append({"method": method, "budget": b["budget"], "reason": why})
                print(f"[bench] {method} @ {b['budget']}: left out: {why}", flush=True)
                continue
            configs.append({"method": method, **b, "overrides": [
                *_method_overrides(method), f"embedding.compression={ratio:.6g}"]})
    return configs, left_out


# ----------------------------------------------------------------------------- runs
def run(data: pathlib.Path, workdir: pathlib.Path, name: str, overrides: list[str],
        in_process: bool = False) -> dict:
    """One `python -m trainer.main` run (a subprocess, or `in_process`: trainer.main.main in this
    process, its console output discarded): its metrics.json, plus the best epoch by val AUC."""
    argv = [*COMMON, *CEL_SETTINGS, f"data.path={data}", f"run.dir={workdir}", f"run.name={name}",
            "tracking.loggers=[jsonl]", "tracking.progress=false", "run.resume=false", *overrides]
    t0 = time.perf_counter()
    if in_process:
        import contextlib
        import io

        from trainer.main import main as train_main
        with contextlib.redirect_stdout(io.StringIO()):
            train_main(argv)
    else:
        proc = subprocess.run([sys.executable, "-m", "trainer.main", *argv], cwd=ROOT,
                              capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"run {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((workdir / name / "metrics.json").read_text())
    evals = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if isinstance(e.get("val_auc"), (int, float))
             and math.isfinite(e["val_auc"])]
    if not evals:
        raise RuntimeError(f"run {name}: no validation AUC in its metrics.jsonl")
    best = max(evals, key=lambda e: e["val_auc"])                 # the first of equal ones
    metrics["best_val_auc"] = best["val_auc"]
    metrics["best_epoch"] = best.get("epoch")
    metrics["wall_s"] = time.perf_counter() - t0
    return metrics


def _point_overrides(point: dict) -> list[str]:
    return [f"{k}={v}" for k, v in point.items()]


def _run_name(cfg: dict, point: dict, seed: int) -> str:
    return (f"{cfg['method']}_{cfg['budget']}_lr{point['train.lr']}_l2{point['train.l2']}"
            f"_s{seed}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.compression_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default="../shared/datasets/ml-100k",
                        help="a MovieLens directory or ratings file (u.data, ratings.dat, ratings.csv)")
    parser.add_argument("--data", default=None,
                        help="the prepared protocol dataset (default data/<source>_cce; prepared "
                             "from --src unless it is there with this protocol)")
    parser.add_argument("--methods", default=METHODS, help=f"embedding.method values (default {METHODS})")
    parser.add_argument("--budgets", default=None,
                        help="comma list of Nx (compression ratios) and B (rows per table); "
                             "default 4x,16x,64x (+256,1024,4096 on larger data)")
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seeds per (method, budget)")
    parser.add_argument("--epochs", type=int, default=None, help=f"default {EPOCHS} (--quick: 3)")
    parser.add_argument("--quick", action="store_true", help="one grid point, 3 epochs, no results "
                        "file unless --results")
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs (subprocesses)")
    parser.add_argument("--in-process", action="store_true",
                        help="train in this process, one run at a time (no interpreter start per "
                             "run: for tests and tiny data)")
    parser.add_argument("--name", default="compression", help="results file name")
    parser.add_argument("--results", default=None, help="results directory (default bench/results)")
    args = parser.parse_args(argv)

    src = pathlib.Path(args.src)
    src = src if src.is_absolute() else (pathlib.Path.cwd() / src)
    name = source_name(src)
    data = pathlib.Path(args.data) if args.data else ROOT / "data" / f"{name}_cce"
    data = data if data.is_absolute() else pathlib.Path.cwd() / data
    meta = ensure_data(data, src)
    nu, ni = int(meta["num_users"]), int(meta["num_items"])
    dataset = f"{name}-cce"
    print(f"[bench] {dataset}: {nu:,} users, {ni:,} items, splits {meta['splits']}", flush=True)
    budgets = args.budgets.split(",") if args.budgets else default_budgets(nu, ni)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from trainer.config import ConfigError
    try:
        configs, left_out = plan(methods, budgets, nu, ni)
    except (ConfigError, ValueError) as exc:
        parser.error(f"--methods / --budgets: {exc}")
    grid = [dict(zip(GRID, v)) for v in itertools.product(*GRID.values())]
    epochs = EPOCHS
    if args.quick:
        grid, epochs = [QUICK_POINT], 3
    epochs = args.epochs or epochs
    seeds = list(range(args.seeds))
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="cel_compression_") as tmp:
        work = pathlib.Path(tmp)

        def one(job):
            cfg, point, seed = job
            run_name = _run_name(cfg, point, seed)
            m = run(data, work, run_name, [*cfg["overrides"], *_point_overrides(point),
                                           f"train.seed={seed}", f"train.epochs={epochs}"],
                    in_process=args.in_process)
            print(f"[bench] {run_name}: best val AUC {m['best_val_auc']:.4f} (epoch "
                  f"{m['best_epoch']}), {m['embedding_bytes']:,} bytes, wall {m['wall_s']:.0f}s",
                  flush=True)
            return job, m

        with ThreadPoolExecutor(max_workers=1 if args.in_process else max(1, args.jobs)) as pool:
            # 1) the grid at seed 0, every config; 2) the other seeds at each config's best point
            first = list(pool.map(one, [(c, p, seeds[0]) for c in configs for p in grid]))
            chosen = {}
            for i, cfg in enumerate(configs):
                mine = [(job[1], m) for job, m in first if job[0] is cfg]
                chosen[i] = max(mine, key=lambda pm: pm[1]["best_val_auc"])
            rest = list(pool.map(one, [(c, chosen[i][0], s) for i, c in enumerate(configs)
                                       for s in seeds[1:]]))

    full_bytes = (nu + ni) * DIM * 4                  # GMF: the tables are d wide
    tuning = [{"method": job[0]["method"], "budget": job[0]["budget"], "lr": job[1]["train.lr"],
               "l2": job[1]["train.l2"], "seed": job[2], "auc": round(m["best_val_auc"], 6),
               "best_epoch": m["best_epoch"], "final_auc": m.get("val_auc")}
              for job, m in first]
    runs, records = [], []
    for i, cfg in enumerate(configs):
        point = chosen[i][0]
        mine = sorted(((job[2], m) for job, m in first + rest if job[0] is cfg and job[1] == point),
                      key=lambda sm: sm[0])
        per_seed = [m for _, m in mine]
        aucs = [m["best_val_auc"] for m in per_seed]
        nbytes = per_seed[0]["embedding_bytes"]
        for seed, m in mine:
            runs.append({"method": cfg["method"], "budget": cfg["budget"], "seed": seed,
                         "auc": round(m["best_val_auc"], 6), "best_epoch": m["best_epoch"],
                         "final_auc": m.get("val_auc"), "embedding_bytes": m["embedding_bytes"],
                         "train_time_s": m.get("train_time_s")})
        rec = {"dataset": dataset, "method": cfg["method"], "model": "gmf",
               "budget": cfg["budget"],
               "target_compression": (round(cfg["target_compression"], 4)
                                      if cfg["target_compression"] else None),
               "budget_rows_per_table": cfg["budget_rows_per_table"],
               "embedding_bytes": nbytes,
               "compression": round(full_bytes / nbytes, 4),
               "auc": round(statistics.fmean(aucs), 6),
               "auc_std": round(statistics.stdev(aucs), 6) if len(aucs) > 1 else 0.0,
               "auc_min": round(min(aucs), 6), "auc_max": round(max(aucs), 6),
               "auc_seeds": [round(a, 6) for a in aucs], "seeds": len(aucs),
               "best_epochs": [m["best_epoch"] for m in per_seed],
               "lr": point["train.lr"], "l2": point["train.l2"], "epochs": epochs,
               "train_time_s": round(statistics.fmean(m.get("train_time_s") or 0.0
                                                      for m in per_seed), 2)}
        if cfg["method"] in ("cel", "cel-narrow"):
            rec["user_clusters"] = per_seed[0].get("num_clusters_users")
            rec["item_clusters"] = per_seed[0].get("num_clusters_items")
        records.append(rec)
    full = next((r for r in records if r["method"] == "full"), None)
    if full is not None:
        assert full["embedding_bytes"] == full_bytes, (full["embedding_bytes"], full_bytes)
        for rec in records:
            rec["auc_minus_full"] = round(rec["auc"] - full["auc"], 4)
    records.sort(key=lambda r: (r["method"] != "full", r["method"], r["embedding_bytes"] * -1))
    print()
    print_table(records, TABLE)
    for lo in left_out:
        print(f"[bench] left out: {lo['method']} @ {lo['budget']}: {lo['reason']}")
    print(f"[bench] {len(first) + len(rest)} runs in {time.perf_counter() - started:.0f} s")
    if not args.quick or args.results:
        path = write_results(
            args.name, records, directory=args.results,
            protocol="GMF (dot product + global bias, sigmoid, BCE), 32-d user and item tables; "
                     "MovieLens with rating 3 dropped, click = rating >= 4, ids compacted after "
                     "dropping, each user's last 2 interactions by timestamp held out "
                     f"(prepare movielens {' '.join(PROTOCOL)})",
            metric="auc: mean over seeds of the best-epoch validation AUC (the protocol has no "
                   "test split: the epoch and the grid point are chosen on the split reported, "
                   "as in the paper); auc_std: sample std (ddof 1); auc_min / auc_max: the seed "
                   "spread",
            compression="full bytes / the run's embedding_bytes (full: (users + items) x 32 x 4); "
                        "Nx budgets: embedding.compression=N on every table; B budgets: "
                        "embedding.compression = (users + items) / (2 B), two B-row tables' "
                        "parameters in total",
            selection=f"per (method, budget): the best GRID point by seed 0's best-epoch val AUC, "
                      f"then seeds 1..{len(seeds) - 1} at it",
            grid=GRID if not args.quick else {k: [v] for k, v in QUICK_POINT.items()},
            epochs=epochs, seeds=len(seeds), optimizer="adam (torch, dense), batch 1024",
            settings=[*COMMON, *CEL_SETTINGS], num_users=nu, num_items=ni,
            splits=meta["splits"], source=meta.get("source"), left_out=left_out,
            runs=runs, tuning=tuning)
        print(f"[bench] wrote {path}")
    return records


if __name__ == "__main__":
    main()
