"""How the retrieval evaluation's cost grows with the catalogue: RankingEvaluator setup and one
full-catalogue evaluation (2,000 users, MF rows of width 33), and one pass of the softmax
reassignment's user log-normalisers, at 1e4 and 1e6 items on random data.

    python -m bench.retrieval_eval_scale     # writes bench/results/retrieval_eval_scale.json
"""
from __future__ import annotations

import pathlib
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.common import print_table, write_results
from trainer.dist import init_distributed
from trainer.models import ITEM, USER, MatrixFactorization
from trainer.retrieval import RankingEvaluator, RetrievalObjective


class _Rows:
    """Fixed user / item rows behind the embedding collection's call signature."""

    def __init__(self, users: torch.Tensor, items: torch.Tensor):
        self.users, self.items = users, items

    def __call__(self, kjt):
        u, i = self.users[kjt[USER].values()], self.items[kjt[ITEM].values()]
        return type("Pooled", (), {"to_dict": lambda self: {USER: u, ITEM: i}})()


def measure(items: int, users: int = 2000, rows: int = 100_000) -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp)
        for split, n in (("train", rows), ("val", rows // 4)):
            (data / split).mkdir()
            pq.write_table(pa.table({"user_id": rng.integers(0, users, n),
                                     "item_id": rng.integers(0, items, n),
                                     "label": np.ones(n, np.float32)}), data / split / "p.parquet")
        t0 = time.perf_counter()
        ev = RankingEvaluator(data, "val", users, items, np.ones(users), np.ones(items), 5)
        t1 = time.perf_counter()
        emb, model = _Rows(torch.randn(users, 33), torch.randn(items, 33)), MatrixFactorization(32)
        ev.evaluate(emb, model, init_distributed(), torch.device("cpu"))
        t2 = time.perf_counter()
        RetrievalObjective("softmax", items, 1, torch.ones(items), 0).user_log_normalisers(
            emb, model, users, torch.device("cpu"))
        t3 = time.perf_counter()
    return {"items": items, "users": users, "train_rows": rows, "setup_s": round(t1 - t0, 3),
            "evaluate_s": round(t2 - t1, 3), "normalisers_s": round(t3 - t2, 3)}


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    records = [measure(n) for n in (10_000, 1_000_000)]
    print_table(records, list(records[0]))
    print(f"[bench] wrote {write_results('retrieval_eval_scale', records, threads=1)}")


if __name__ == "__main__":
    main(sys.argv[1:])
