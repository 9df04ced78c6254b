"""Train CEL (or a baseline) on one process or several.

    python -m trainer.main --config configs/synthetic_small.yaml [key=value ...]
    torchrun --nproc_per_node=2 -m trainer.main --config configs/synthetic_small.yaml
    python -m trainer.main --config configs/ml100k_mf.yaml embedding.method=full

Prints the run directory and a final metrics table; writes RUN_DIR/metrics.json.
"""
from __future__ import annotations

import argparse
import sys

from trainer.config import load_config

# the headline metrics printed at the end of a run (metrics.json has them all)
HEADLINE = ("val_rmse", "val_rmse_cold", "val_rmse_warm", "best_val_rmse", "val_auc",
            "val_logloss", "val_auc_cold", "embedding_bytes", "embedding_state_bytes",
            "num_clusters_items", "num_clusters_users", "steps", "epochs", "train_time_s", "split_time_s",
            "reassign_time_s")


def format_metrics(metrics: dict) -> str:
    """The headline metrics as an aligned two-column table."""
    rows = [(k, f"{metrics[k]:.4f}" if isinstance(metrics[k], float) else str(metrics[k]))
            for k in HEADLINE if k in metrics and metrics[k] is not None]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m trainer.main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--verbose", action="store_true",
                        help="third-party logging on the console too (tracking.verbose=true)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (tracking.progress=false)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [*args.overrides,
                                    *(["tracking.verbose=true"] if args.verbose else []),
                                    *(["tracking.progress=false"] if args.no_progress else [])])
    from trainer.logs import quiet_console
    quiet_console(cfg.tracking.verbose)          # before TorchRec and FBGEMM are imported
    from trainer.worker import run_worker
    metrics = run_worker(cfg)
    import os
    if int(os.environ.get("RANK", "0")) == 0:
        print("[train] final metrics:\n" + format_metrics(metrics), flush=True)
    return metrics


if __name__ == "__main__":
    from data_pipeline.errors import DataError
    try:
        main()
    except (ValueError, FileNotFoundError, DataError) as exc:   # bad config or data: no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
