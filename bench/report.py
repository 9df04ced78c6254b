"""Print every bench/results/*.json as a Markdown table (the README's tables come from here).

    python -m bench.report [NAME ...]
"""
from __future__ import annotations

import json
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
COLUMNS["scale_1e6"] = COLUMNS["scale_1e7"] = COLUMNS["scale"]   # the big sizes, run on their own
SKIP = {"note", "args"}


def report(name: str) -> str:
    data = json.loads((RESULTS_DIR / f"{name}.json").read_text())
    records = data["records"]
    cols = COLUMNS.get(name)
    if cols is None:
        cols = [k for k in dict.fromkeys(k for r in records for k in r) if k not in SKIP]
    cols = [c for c in cols if any(c in r for r in records)]
    where = data.get("device") or data.get("machine", "")
    print(f"\n### {name} (commit {data.get('commit', '?')}, {where}, {data.get('created', '')})\n")
    return print_table(records, cols)


def main(argv: list[str]) -> None:
    names = argv or sorted(p.stem for p in RESULTS_DIR.glob("*.json"))
    for name in names:
        report(name)


if __name__ == "__main__":
    main(sys.argv[1:])
