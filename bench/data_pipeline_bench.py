"""Data pipeline throughput and peak memory: conversion (ML-100K prepare, 1e7-row synthetic
generation) and reading (local pyarrow reader, Ray Data reader), rows/s.

    python -m bench.data_pipeline_bench [--ml100k ../shared/datasets/ml-100k] [--synth-rows 10000000]

Every measurement runs in a fresh subprocess, so each peak RSS (ru_maxrss) belongs to that phase
alone. Writes bench/results/data_pipeline.json.
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

from bench.common import peak_rss_bytes, print_table, write_results

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- phases (child)
def _prepare_ml100k(src: str, out: str) -> dict:
    from data_pipeline.sources.movielens import prepare_movielens
    start = time.perf_counter()
    meta = prepare_movielens(src, out, overwrite=True)
    seconds = time.perf_counter() - start
    return {"rows": sum(meta.splits.values()), "seconds": seconds,
            "note": f"users={meta.num_users} items={meta.num_items} splits={meta.splits}"}


def _synth(out: str, rows: int) -> dict:
    from data_pipeline.synthetic import generate_synthetic
    users, items = max(1000, rows // 20), max(500, rows // 100)
    start = time.perf_counter()
    meta = generate_synthetic(out, users=users, items=items, interactions=rows, clusters=32,
                              overwrite=True)
    seconds = time.perf_counter() - start
    return {"rows": sum(meta.splits.values()), "seconds": seconds,
            "note": f"users={users} items={items} clusters=32"}


def _read_local(path: str, batch_size: int) -> dict:
    from data_pipeline.local import ParquetBatchReader
    reader = ParquetBatchReader(f"{path}/train", batch_size=batch_size, shuffle=True, seed=0)
    start = time.perf_counter()
    rows = sum(len(b["label"]) for b in reader)
    return {"rows": rows, "seconds": time.perf_counter() - start,
            "note": f"batch={batch_size} shuffle=True world=1"}


def _read_ray(path: str, batch_size: int) -> dict:
    import ray
    from data_pipeline.ray_data import iter_numpy_batches, read_split
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = read_split(path, "train")
        start = time.perf_counter()
        rows = sum(len(b["label"]) for b in iter_numpy_batches(ds, batch_size))
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {"rows": rows, "seconds": seconds,
            "note": f"batch={batch_size} no shuffle; driver RSS only (Ray workers excluded)"}


PHASES = {"prepare_ml100k": _prepare_ml100k, "synth": _synth, "read_local": _read_local,
          "read_ray": _read_ray}


def _child(phase: str, args: list) -> None:
    result = PHASES[phase](*args)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver
def measure(dataset: str, method: str, phase: str, *args) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.data_pipeline_bench", "--child", phase,
                           json.dumps(list(args))], cwd=ROOT, text=True, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{phase} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    record = {"dataset": dataset, "method": method, "rows": result["rows"],
              "rows_per_s": result["rows"] / result["seconds"], "seconds": result["seconds"],
              "peak_rss_bytes": result["peak_rss_bytes"], "note": result["note"]}
    print(f"  {dataset:<14} {method:<14} {record['rows']:>11,} rows {record['seconds']:8.2f} s "
          f"{record['rows_per_s']:>13,.0f} rows/s  peak {record['peak_rss_bytes'] / 2**20:,.0f} MiB",
          flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ml100k", default=str(ROOT.parent / "shared" / "datasets" / "ml-100k"))
    parser.add_argument("--synth-rows", type=int, default=10_000_000)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--work-dir", default=None, help="scratch space (default: a temp dir)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], json.loads(args.child[1]))
        return
    records = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        ml, synth = f"{work}/ml100k", f"{work}/synth"
        name = f"synth-{args.synth_rows:.0e}".replace("+0", "")
        if os.path.isdir(args.ml100k):
            records.append(measure("ml-100k", "prepare", "prepare_ml100k", args.ml100k, ml))
            records.append(measure("ml-100k", "read_local", "read_local", ml, args.batch_size))
            records.append(measure("ml-100k", "read_ray", "read_ray", ml, args.batch_size))
        else:
            print(f"skipping ML-100K: {args.ml100k} not found", flush=True)
        records.append(measure(name, "synth", "synth", synth, args.synth_rows))
        records.append(measure(name, "read_local", "read_local", synth, args.batch_size))
        records.append(measure(name, "read_ray", "read_ray", synth, args.batch_size))
    print_table(records, ["dataset", "method", "rows", "rows_per_s", "seconds", "peak_rss_bytes"])
    path = write_results("data_pipeline", records, batch_size=args.batch_size)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
