"""CEL's pure-torch ops on one device vs a plain embedding lookup of the same batch.

    python bench/gpu_ops_bench.py [--out results.json] [--device cuda]

Times (median over repetitions, synchronised) `remap_ids`, the cluster lookup behind it,
`cluster_grad_scale` (members / batch), `scatter_entity_grads` into a split window, and
`segment_covariance` + `gpca_split` of the largest clusters, next to a
`torch.nn.functional.embedding` lookup of the same ids in a full `[entities, dim]` table.
Needs only torch (no torchrec), so it runs on GPU machines without fbgemm.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cel_torchrec.algorithm import (cluster_grad_scale, gpca_split, remap_ids,  # noqa: E402
                                    scatter_entity_grads, segment_covariance)


def timed(fn, device, reps: int, warmup: int = 3) -> float:
    """Median seconds of `fn()` with device synchronisation around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--entities", type=int, default=1_000_000)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--split-clusters", type=int, default=8, help="clusters split per event")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    n, m, d, b = args.entities, args.clusters, args.dim, args.batch

    assignment = torch.randint(0, m, (n,), generator=g, dtype=torch.int32).to(device)
    ids = (torch.rand(b, generator=g) ** 2 * n).long().to(device)        # skewed popularity
    full_table = torch.randn(n, d, generator=g).to(device)
    cluster_table = torch.randn(m, d, generator=g).to(device)
    grads = torch.randn(b, d, generator=g).to(device)
    member_counts = torch.bincount(assignment.long(), minlength=m)
    cluster_ids = remap_ids(assignment, ids)
    # split window over the `split_clusters` largest clusters
    parents = torch.topk(member_counts, args.split_clusters).indices
    in_parent = torch.zeros(m, dtype=torch.bool, device=device)
    in_parent[parents] = True
    member = in_parent[assignment.long()]
    slot = torch.full((n,), -1, dtype=torch.long, device=device)
    slot[member] = torch.arange(int(member.sum()), device=device)
    entities = member.nonzero().flatten()
    window = torch.zeros(entities.numel(), d, device=device)
    member_grads = torch.randn(entities.numel(), d, generator=g).to(device)
    seg = torch.full((m,), -1, dtype=torch.long, device=device)
    seg[parents] = torch.arange(parents.numel(), device=device)
    member_seg = seg[assignment.long()[entities]]

    rows = {
        "full_embedding_lookup": lambda: F.embedding(ids, full_table),
        "remap_ids": lambda: remap_ids(assignment, ids),
        "remap_plus_cluster_lookup": lambda: F.embedding(remap_ids(assignment, ids), cluster_table),
        "cluster_grad_scale_members": lambda: cluster_grad_scale(ids, cluster_ids, member_counts, "members"),
        "cluster_grad_scale_batch": lambda: cluster_grad_scale(ids, cluster_ids, member_counts, "batch"),
        "member_counts_bincount": lambda: torch.bincount(assignment.long(), minlength=m),
        "scatter_entity_grads": lambda: scatter_entity_grads(window, slot, ids, grads),
        "segment_covariance": lambda: segment_covariance(member_grads.double(), member_seg,
                                                         parents.numel()),
        "gpca_split": lambda: gpca_split(assignment, m - args.split_clusters, m + args.split_clusters,
                                         parents, entities, member_grads),
    }
    records = []
    base = None
    for name, fn in rows.items():
        reps = args.reps if not name.startswith(("gpca", "segment")) else max(5, args.reps // 5)
        t = timed(fn, device, reps)
        base = t if name == "full_embedding_lookup" else base
        records.append({"op": name, "seconds": t, "vs_full_lookup": t / base,
                        "batch": b, "entities": n, "clusters": m, "dim": d,
                        "split_members": int(entities.numel()) if name in ("gpca_split", "segment_covariance") else None})
        print(f"{name:28s} {t * 1e6:10.1f} us   {t / base:7.2f}x full lookup", flush=True)
    payload = {"benchmark": "gpu_ops", "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "args": {k: v for k, v in vars(args).items() if k != "out"},   # not where it was written
               "records": records}
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
