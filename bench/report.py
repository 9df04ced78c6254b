"""Print every bench/results/*.json as a Markdown table (the README's tables come from here),
or write the README's plots.

    python -m bench.report [NAME ...]
    python -m bench.report --plots DIR [--run RUN_DIR] [NAME ...]

--plots writes PNGs into DIR (see bench/plots.py) and prints each path: quality vs embedding bytes
per results file (NAMEs restrict which), and from one training run the cluster count over steps,
the final cluster-size distribution and the split/reassignment time per epoch. Without --run the
run plots come from the newest run directory under runs/; with none there they are skipped with a
note. A --run path that is not a run directory is an error (exit 2).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from bench.common import RESULTS_DIR, print_table

# columns shown per benchmark (others: every key of the records except long ones)
COLUMNS = {
    "quality_ml100k": ["method", "model", "item_clusters", "user_clusters", "embedding_bytes",
                       "best_val_rmse", "best_val_rmse_cold", "val_rmse", "time_to_best_s",
                       "train_time_s"],
    "data_pipeline": ["dataset", "method", "rows", "rows_per_s", "seconds", "peak_rss_bytes"],
    "sharded": ["method", "grad_average", "batch_scope", "sharding", "world_size", "batch_size",
                "step_time_s", "vs_full", "vs_full_rounds_p25", "vs_full_rounds_p75",
                "samples_per_s", "embedding_bytes", "phase",
                "seconds", "fraction_of_epoch"],
    "gpu_ops": ["op", "seconds", "vs_full_lookup", "batch", "entities", "clusters", "dim"],
    "scale": ["entities", "processes", "method", "reassign_mode", "item_clusters", "samples_per_s", "epoch_s",
              "split_s", "reassign_s", "phase_share", "peak_rss_bytes", "embedding_state_bytes",
              "val_rmse", "val_rmse_cold", "purity_items", "ari_items"],
    "quality_ml100k_fused": ["model", "method", "fused_tables", "best_val_rmse", "val_rmse",
                             "best_val_rmse_cold", "best_epoch", "train_time_s"],
    "quality_ml100k_lite": ["model", "reassign_mode", "lite_scoring", "item_clusters", "best_val_rmse", "val_rmse",
                            "best_val_rmse_cold", "best_epoch", "reassign_time_s", "train_time_s"],
    "ray": ["method", "workers", "samples_per_s", "seconds", "vs_local", "first_epoch_s", "wall_s"],
    "ctr": ["dataset", "model", "method", "lite_scoring", "compression", "embedding_bytes", "val_auc",
            "auc_minus_full", "val_logloss", "val_ne", "val_auc_cold", "train_time_s",
            "reassign_time_s"],
    "sharded_ctr": ["method", "sparse_features", "world_size", "batch_size", "step_time_s",
                    "samples_per_s", "vs_full", "vs_full_steps_p25", "vs_full_steps_p75",
                    "embedding_bytes", "compression", "clusters"],
}
COLUMNS["retrieval"] = ["method", "item_clusters", "item_side_bytes", "compression", "lr", "l2",
                        "best_epoch", "recall_at_20", "ndcg_at_20", "recall_at_10", "recall_at_50",
                        "recall_at_20_cold_items", "vs_full_recall_at_20", "train_time_s"]
COLUMNS["compression"] = ["dataset", "method", "budget", "target_compression", "compression",
                          "embedding_bytes", "auc", "auc_std", "auc_min", "auc_max",
                          "auc_minus_full", "seeds", "lr", "l2", "best_epochs", "train_time_s"]
COLUMNS["cel_headroom"] = ["part", "variant", "item_clusters", "item_side_bytes", "compression",
                           "seeds", "best_val_rmse_mean", "best_val_rmse_std", "best_val_rmse_min",
                           "vs_target", "best_epoch", "recall_at_20", "vs_full_recall_at_20"]
COLUMNS["scale_1e6"] = COLUMNS["scale_1e7"] = COLUMNS["scale"]   # the big sizes, run on their own
SKIP = {"note", "args"}


def report(name: str, results_dir: pathlib.Path | None = None) -> str:
    data = json.loads(((results_dir or RESULTS_DIR) / f"{name}.json").read_text())
    records = data["records"]
    cols = COLUMNS.get(name)
    if cols is None:
        cols = [k for k in dict.fromkeys(k for r in records for k in r) if k not in SKIP]
    cols = [c for c in cols if any(c in r for r in records)]
    where = data.get("device") or data.get("machine", "")
    print(f"\n### {name} (commit {data.get('commit', '?')}, {where}, {data.get('created', '')})\n")
    return print_table(records, cols)


RUNS_DIR = pathlib.Path("runs")        # the trainer's default run.dir, relative to the cwd


def plots(out_dir: str, run: str | None, names: list[str], results_dir: pathlib.Path) -> list:
    from bench import plots as P
    if run is not None:
        run_dir = pathlib.Path(run)
        if not P.is_run_dir(run_dir):
            print(f"error: --run {run}: not a run directory (no {' or '.join(P.RUN_FILES)} "
                  "there)" if run_dir.is_dir() else f"error: --run {run}: no such directory",
                  file=sys.stderr, flush=True)
            raise SystemExit(2)
    else:
        run_dir = P.newest_run(RUNS_DIR)
        if run_dir is None:
            print(f"[plots] no run directory under {RUNS_DIR}/ (pass --run RUN_DIR): skipped "
                  f"{', '.join(P.RUN_PLOTS)}", flush=True)
        else:
            print(f"[plots] run plots from the newest run under {RUNS_DIR}/: {run_dir}", flush=True)
    written = P.write_all(out_dir, results_dir, run_dir, names or None,
                          note=lambda text: print(text, flush=True))
    for path in written:
        print(path, flush=True)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help="results files (bench/results/NAME.json)")
    parser.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR instead of tables")
    parser.add_argument("--run", metavar="RUN_DIR", help="the training run the run plots show "
                        "(default: the newest under runs/)")
    parser.add_argument("--results", metavar="DIR", default=str(RESULTS_DIR),
                        help="where the results files are (default: bench/results)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.plots is None:
        if args.run is not None:
            parser.error("--run needs --plots DIR")
        results_dir = pathlib.Path(args.results)
        for name in args.names or sorted(p.stem for p in results_dir.glob("*.json")):
            report(name, results_dir)
        return
    plots(args.plots, args.run, args.names, pathlib.Path(args.results))


if __name__ == "__main__":
    main()
