"""How the compact methods' costs grow with the table (1e4 -> 1e6 ids, 32-wide rows, 1 thread):
one training step (batch 4,096 ids: forward + backward, then torch's dense Adam step, which
touches every row of the training tables: for sparse that is the full-size n x 32 table, whose
rows the trainer's fused FBGEMM path updates only where looked up) of sparse / CCE / CERP, and
their phases: CCE's clustering (k-means over a sample of 256 ids per row, then every id
against every centroid), CERP's budget-mask refresh (a top-k over its meta tables). CCE and
CERP get the CCE paper's budget of 1,024 rows per table (so their tables stay the same size as
the ids grow); sparse keeps 2 of 32 values per row.

    python -m bench.compact_scale        # writes bench/results/compact_scale.json
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bench.common import print_table, write_results
from cel_torchrec.modules.compact import (CCEEmbeddingBagCollection, CCEShape,
                                          CERPEmbeddingBagCollection, CERPShape,
                                          SparseEmbeddingBagCollection)

DIM, BATCH, ROWS = 32, 4096, 1024


def build(method: str, n: int):
    tables = [EmbeddingBagConfig(name="item", embedding_dim=DIM, num_embeddings=n,
                                 feature_names=["item_id"])]
    if method == "sparse":
        emb = SparseEmbeddingBagCollection(tables, {"item": 2})
    elif method == "cce":
        emb = CCEEmbeddingBagCollection(tables, {"item": CCEShape(chunks=1, rows=ROWS)})
    else:
        m = max(1, n // ROWS)      # ROWS remainder rows and n / ROWS quotient rows
        emb = CERPEmbeddingBagCollection(tables, {"item": CERPShape(m, ROWS * DIM)})
    with torch.no_grad():
        for p in emb.parameters():
            p.normal_(0, 0.1)
    if hasattr(emb, "after_init"):
        emb.after_init()
    return emb


def measure(method: str, n: int, steps: int = 20) -> dict:
    emb = build(method, n)
    opt = torch.optim.Adam(emb.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    times, opt_times = [], []
    for _ in range(steps + 3):
        ids = torch.randint(n, (BATCH,), generator=g)
        kjt = KeyedJaggedTensor(keys=["item_id"], values=ids, lengths=torch.ones(BATCH, dtype=torch.long))
        t0 = time.perf_counter()
        out = emb(kjt)["item_id"]
        loss = (out * out).sum(1).mean()
        penalty = emb.penalty() if hasattr(emb, "penalty") else None
        (loss if penalty is None else loss + penalty).backward()
        t1 = time.perf_counter()
        opt.step(), opt.zero_grad()
        times.append(t1 - t0), opt_times.append(time.perf_counter() - t1)
    t0 = time.perf_counter()
    if method == "cce":
        emb.after_epoch(1, 4, opt)
    elif method == "cerp":
        emb.refresh_masks()
    phase = time.perf_counter() - t0 if method != "sparse" else 0.0
    return {"method": method, "ids": n, "embedding_bytes": emb.embedding_bytes(),
            "forward_backward_ms": round(1e3 * statistics.median(times[3:]), 3),
            "adam_step_ms": round(1e3 * statistics.median(opt_times[3:]), 3),
            "phase": {"cce": "clustering", "cerp": "mask refresh", "sparse": "none"}[method],
            "phase_s": round(phase, 3)}


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    records = []
    for method in ("sparse", "cce", "cerp"):
        for n in (10_000, 100_000, 1_000_000):
            records.append(measure(method, n))
            print(records[-1], flush=True)
    print_table(records, list(records[0]))
    print(f"[bench] wrote {write_results('compact_scale', records, threads=1, batch=BATCH, dim=DIM, rows_per_table=ROWS)}")


if __name__ == "__main__":
    main(sys.argv[1:])
