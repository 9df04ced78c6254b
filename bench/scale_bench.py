"""CEL at growing table sizes: planted synthetic data with ~10 interactions per entity, CEL
(Lite and exact reassignment), the oracle (planted assignment, rows trained) and the full model,
one process each (and the full model and CEL-Lite on 2 gloo processes), side by side per size.

    python -m bench.scale_bench [--sizes 10000 100000 1000000] [--epochs 2] [--planted 16]
                                [--procs 1 2] [--methods full,oracle,cel,cel_gated]

Each run is the real trainer (`trainer.main`, fresh subprocess, so its peak RSS is its own) on
`data.synthetic` with `users = items = size`, `interactions = 10 * size`, MF with 32 table
columns, batch 8192, Adagrad. CEL gets `4 x planted` clusters per table (splits until the budget,
coverage-closed windows that double the cluster count, reassignment twice per epoch) and a run at
budget = planted (for the adjusted Rand index), and the budget runs again with reassignment gated
by significance (`cel.reassign_min_gain=3`, entities under 3 interactions pooled). Records samples/s, seconds per epoch with and
without phases, each phase's seconds and share, peak RSS, embedding bytes (serving) and embedding state bytes (training: tables, optimizer
state, maps, counters, split windows, the Lite buffer, at their peak), val RMSE (all / cold), purity and ARI
on warm entities. Per size, a `planted_map` row: the purity and ARI of each warm entity's
maximum-likelihood planted cluster given the planted rows (`trainer.planted.planted_map_reference`),
what a per-entity loss decision reaches when the rows are exactly right, so learned purity is read
against what ~10 interactions per entity can identify. Prints a table and writes bench/results/scale.json.
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

from bench.common import print_table, write_results
from data_pipeline.synthetic import ensure_synthetic
from trainer.planted import planted_map_reference

COLUMNS = ["entities", "processes", "method", "reassign_mode", "item_clusters", "samples_per_s",
           "epoch_s", "epoch_s_without_phases", "split_s", "reassign_s", "phase_share",
           "peak_rss_bytes", "embedding_bytes", "embedding_state_bytes", "val_rmse",
           "val_rmse_cold", "purity_items", "purity_users", "ari_items", "ari_users"]

_RUNNER = r"""
import json, os, resource, sys
from trainer.config import load_config
from trainer.worker import run_worker
args = sys.argv[1:]
config = args.pop(0)[len("--config="):] if args and args[0].startswith("--config=") else None
cfg = load_config(config or None, args)
m = run_worker(cfg)
m["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if int(os.environ.get("RANK", "0")) == 0:
    print("SCALE_RESULT " + json.dumps({k: v for k, v in m.items() if not isinstance(v, (list, dict))}))
"""


def run_one(overrides: list[str], timeout: float, procs: int = 1, config: str | None = None) -> dict:
    """One trainer run in a fresh process (`procs` > 1: torchrun with that many gloo ranks, one
    intra-op thread each) on `config` (a YAML file; None: the defaults) plus `overrides`; its
    metrics plus the largest RSS of any of its processes."""
    if config is not None:
        overrides = [f"--config={config}", *overrides]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if procs == 1:
        cmd = [sys.executable, "-c", _RUNNER, *overrides]
    else:
        env["OMP_NUM_THREADS"] = "1"
        runner = pathlib.Path(tempfile.mkdtemp(prefix="scale_runner_")) / "runner.py"
        runner.write_text(_RUNNER)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", str(runner), *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=pathlib.Path(__file__).resolve().parent.parent)
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("SCALE_RESULT "):
            out = json.loads(line[len("SCALE_RESULT "):])
            out["wall_s"] = wall
            return out
    raise RuntimeError(f"run failed ({' '.join(overrides)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def base_overrides(size: int, args, run_dir: str, name: str) -> list[str]:
    steps_per_epoch = max(1, int(0.8 * 10 * size) // args.batch)
    return [
        "data.kind=synthetic", f"data.synthetic.users={size}", f"data.synthetic.items={size}",
        f"data.synthetic.interactions={10 * size}", f"data.synthetic.clusters={args.planted}",
        "data.synthetic.seed=0", f"data.cache_dir={args.cache}", f"data.batch_size={args.batch}",
        "data.eval_batch_size=65536", "model.name=mf", "model.embedding_dim=31",
        "train.optimizer=adagrad", f"train.lr={args.lr}", f"train.epochs={args.epochs}",
        "tracking.loggers=[jsonl]", f"tracking.log_every_steps={max(steps_per_epoch, 1)}",
        f"run.dir={run_dir}", f"run.name={name}", "run.resume=false",
        "cel.interval_unit=step", "cel.reassign_rule=every",
        f"cel.reassign_period={max(2, steps_per_epoch // 2)}",
        f"cel.split_until={10 ** 9}", f"cel.split_coverage={args.coverage}",
        "cel.items.splits_per_event=0", "cel.users.splits_per_event=0",
    ]


def record_of(size: int, method: str, mode: str | None, clusters: int | None, m: dict,
              epochs: int) -> dict:
    train = m.get("train_time_s") or 0.0
    split, reassign = m.get("split_time_s") or 0.0, m.get("reassign_time_s") or 0.0
    rows = 0.8 * 10 * size * epochs
    return {"dataset": f"planted_synthetic_{size}", "entities": size, "method": method,
            "reassign_mode": mode, "item_clusters": clusters, "user_clusters": clusters,
            "model": "mf", "samples_per_s": rows / train if train else None,
            "epoch_s": train / epochs, "epoch_s_without_phases": (train - split - reassign) / epochs,
            "split_s": split, "reassign_s": reassign,
            "phase_share": (split + reassign) / train if train else None,
            "peak_rss_bytes": m.get("peak_rss_bytes"), "embedding_bytes": m.get("embedding_bytes"),
            "embedding_state_bytes": m.get("embedding_state_bytes"),
            "val_rmse": m.get("val_rmse"), "val_rmse_cold": m.get("val_rmse_cold"),
            "best_val_rmse": m.get("best_val_rmse"),
            "purity_items": m.get("purity_items"), "purity_users": m.get("purity_users"),
            "ari_items": m.get("ari_items"), "ari_users": m.get("ari_users"),
            "num_clusters_items": m.get("num_clusters_items"), "steps": m.get("steps"),
            "wall_s": m.get("wall_s")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--planted", type=int, default=16)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--coverage", type=float, default=2.0)
    p.add_argument("--exact-max-cells", type=float, default=2 ** 25,
                   help="run exact reassignment only where entities x clusters <= this")
    p.add_argument("--methods", default="full,oracle,cel,cel_gated",
                   help="comma-separated subset of full,oracle,cel,cel_gated")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2],
                   help="process counts (> 1: torchrun, gloo; full and CEL-Lite at the budget)")
    p.add_argument("--cache", default="data/cache")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--name", default="scale")
    args = p.parse_args(argv)
    records = []
    with tempfile.TemporaryDirectory() as run_dir:
        for size in args.sizes:
            budget = 4 * args.planted
            plans = [("full", None, None, ["embedding.method=full"]),
                     ("oracle", None, args.planted,
                      ["embedding.method=cel", "cel.init_from_planted=true", "cel.reassign_rule=none",
                       "cel.split_until=0", "cel.items.enabled=true", "cel.users.enabled=true",
                       f"cel.items.max_clusters={args.planted}", f"cel.users.max_clusters={args.planted}"])]
            for mode in ("lite", "exact"):
                if mode == "exact" and size * budget > args.exact_max_cells:
                    continue
                for clusters in (budget, args.planted):
                    if mode == "exact" and clusters != budget:
                        continue
                    plans.append(("cel", mode, clusters,
                                  ["embedding.method=cel", f"cel.reassign_mode={mode}",
                                   "cel.items.enabled=true", "cel.users.enabled=true",
                                   f"cel.items.max_clusters={clusters}",
                                   f"cel.users.max_clusters={clusters}"]))
            # the same CEL runs with reassignment gated by significance: an entity moves only if
            # it saves > 3x the mean loss per interaction, and entities with < 3 interactions
            # are pooled (scored together per cluster) instead of moved one by one
            gate = ["cel.reassign_min_gain=3", "cel.items.unseen_policy=pooled",
                    "cel.users.unseen_policy=pooled", "cel.items.cold_interactions=3",
                    "cel.users.cold_interactions=3"]
            plans += [("cel_gated", mode, clusters, [*extra, *gate])
                      for method, mode, clusters, extra in list(plans)
                      if method == "cel" and clusters == budget]
            plans = [(*pl, 1) for pl in plans if pl[0] in args.methods.split(",")]
            # several gloo processes: the full model and CEL-Lite at the budget, side by side
            for procs in (p for p in args.procs if p > 1):
                plans += [(*pl[:4], procs) for pl in plans
                          if pl[4] == 1 and (pl[0] == "full" or (pl[0] == "cel" and pl[1] == "lite"
                                                                 and pl[2] == budget))]
            # what the data itself allows: each warm entity's maximum-likelihood planted cluster
            # given the planted rows (block means); learned clusters' purity is read against it
            data_dir = ensure_synthetic(args.cache, users=size, items=size, interactions=10 * size,
                                        clusters=args.planted, seed=0, label="rating")
            ref = planted_map_reference(data_dir)
            records.append({"dataset": f"planted_synthetic_{size}", "entities": size,
                            "method": "planted_map", "processes": None,
                            "item_clusters": args.planted, "user_clusters": args.planted,
                            "purity_items": ref["map_purity_items"],
                            "purity_users": ref["map_purity_users"],
                            "ari_items": ref["map_ari_items"], "ari_users": ref["map_ari_users"],
                            "map_accuracy_items": ref["map_accuracy_items"],
                            "map_accuracy_users": ref["map_accuracy_users"]})
            print(f"[scale] {size}: planted-row MAP purity users {ref['map_purity_users']:.3f} "
                  f"items {ref['map_purity_items']:.3f}", flush=True)
            for method, mode, clusters, extra, procs in plans:
                name = f"{size}_{method}_{mode}_{clusters}_p{procs}"
                print(f"[scale] {name} ...", flush=True)
                m = run_one(base_overrides(size, args, run_dir, name) + extra, args.timeout, procs)
                rec = record_of(size, method, mode, clusters, m, args.epochs)
                rec["processes"] = procs
                records.append(rec)
                print(f"[scale] {name}: val_rmse {rec['val_rmse']:.4f} epoch {rec['epoch_s']:.1f} s "
                      f"phases {rec['phase_share'] or 0:.1%} rss {rec['peak_rss_bytes'] / 2**20:.0f} MiB",
                      flush=True)
                write_results(args.name, records, sizes=args.sizes, epochs=args.epochs,
                              planted=args.planted, batch=args.batch)
    print_table(records, COLUMNS)


if __name__ == "__main__":
    main()
