"""Sharded DLRM step time with CEL vs full tables on 2 gloo CPU processes (many sparse features).

    python -m bench.sharded_ctr_bench [--vocab-max 100000 --features 26 --dim 16 --batch 4096 ...]

The synth-ctr layout: 13 dense features and `--features` single-hot categorical features whose
vocabularies spread log-uniformly from 10 to `--vocab-max` (`data_pipeline.synthetic_ctr`), ids
drawn with a power-law popularity. Both runs use the trainer's DLRM (TorchRec's DenseArch /
InteractionArch / OverArch), BCE, table-wise sharding by TorchRec's planner, FBGEMM's fused
EXACT_ADAGRAD for the tables and torch Adagrad for the data-parallel (DDP) MLPs, the same batches
and learning rate. CEL clusters every table with >= `--min-cardinality` rows at the trainer's
`embedding.compression` rule (`trainer.builders.compressed_rows`, int32 map counted), with its
split windows open as in training. The models are timed in interleaved rounds (one step of each
in turn) so that the shared machine's drift hits both alike. Prints a table and writes
bench/results/sharded_ctr.json.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NUM_DENSE = 13


def _sizes(args) -> list[int]:
    from data_pipeline.synthetic_ctr import vocab_sizes
    return [int(n) for n in vocab_sizes(args.features, 10, args.vocab_max)]


def _specs(args) -> list[tuple[str, str, int]]:
    return [(f"t{i}", f"f{i}", n) for i, n in enumerate(_sizes(args))]


def _cluster_rows(args) -> dict[str, int]:
    """Clusters per table under the trainer's `embedding.compression` rule."""
    from trainer.builders import compressed_rows
    from trainer.config import load_config
    cfg = load_config(None, ["embedding.method=cel", f"embedding.compression={args.compression}",
                             f"embedding.min_cardinality={args.min_cardinality}"])
    return compressed_rows(cfg, _specs(args), args.dim)


def _batches(args, rank, world, n):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    g = torch.Generator().manual_seed(rank)
    local = args.batch // world
    specs = _specs(args)
    out = []
    for _ in range(n):
        ids = [(torch.rand(local, generator=g) ** 3 * size).long() for _, _, size in specs]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f for _, f, _ in specs], values=torch.cat(ids),
            lengths=torch.ones(local * len(specs), dtype=torch.long))
        dense = torch.randn(local, NUM_DENSE, generator=g)
        out.append((kjt, dense, (torch.rand(local, generator=g) < 0.25).float()))
    return out


class _Run:
    """One model: sharded tables (DMP), the DLRM head in DDP, its torch optimizer."""

    def __init__(self, emb, args):
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        from cel_torchrec.distributed import fused_params, shard_model
        from trainer.models import DLRM
        torch.manual_seed(0)
        self.emb = shard_model(emb, sharding_type="table_wise",
                               fused_params=fused_params("adagrad", args.lr))
        torch.manual_seed(0)
        self.head = torch.nn.parallel.DistributedDataParallel(
            DLRM([f for _, f, _ in _specs(args)], args.dim, NUM_DENSE, [32], [64, 32]))
        params = [*self.head.parameters(),
                  *(p for _, p in in_backward_optimizer_filter(self.emb.named_parameters()))]
        self.opt = torch.optim.Adagrad(params, lr=args.lr)

    def step(self, kjt, dense, label) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        logit = self.head(self.emb(kjt).to_dict(), dense)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, label)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        dist.barrier()
        return time.perf_counter() - t0


def _worker(rank, world, port, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from cel_torchrec.distributed import clustered_modules
    from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig

    tables = [EmbeddingBagConfig(name=t, embedding_dim=args.dim, num_embeddings=n,
                                 feature_names=[f]) for t, f, n in _specs(args)]
    rows = _cluster_rows(args)
    clustering = {t: ClusteringConfig(max_clusters=r, init_clusters=max(1, r // 2))
                  for t, r in rows.items()}
    batches = _batches(args, rank, world, args.steps)
    runs = {"full": _Run(EmbeddingBagCollection(tables=tables, device=torch.device("meta")), args),
            "cel": _Run(ClusteredEmbeddingBagCollection(tables, clustering), args)}
    (_, cel), = clustered_modules(runs["cel"].emb).items()
    for table in rows:
        cel.begin_split_window(table)          # record window gradients, as in training
    for run in runs.values():
        for b in batches[:args.warmup]:
            run.step(*b)
    times = {name: [] for name in runs}
    for kjt, dense, label in batches:
        for name, run in runs.items():          # interleaved: one step of each in turn
            times[name].append(run.step(kjt, dense, label))
    if rank == 0:
        torch.save({"times": times, "cel_bytes": cel.embedding_bytes(), "clusters": rows},
                   os.path.join(out_dir, "rank0.pt"))
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab-max", type=int, default=100_000)
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--compression", type=float, default=12.0)
    p.add_argument("--min-cardinality", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4096, help="global batch (split over ranks)")
    p.add_argument("--steps", type=int, default=300, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args(argv)
    from bench.common import print_table, write_results

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(args.world, port, args, out_dir), nprocs=args.world,
                           join=True, start_method="spawn")
        res = torch.load(os.path.join(out_dir, "rank0.pt"), weights_only=False)
    times = res["times"]
    sizes = _sizes(args)
    full_bytes = sum(sizes) * args.dim * 4
    full_s = statistics.median(times["full"])
    cel_s = statistics.median(times["cel"])
    # the per-step ratio of adjacent steps: its spread is the shared machine's noise
    ratios = [c / f for c, f in zip(times["cel"], times["full"])]
    q = statistics.quantiles(ratios, n=4)
    common = {"dataset": f"synth_ctr_layout_{args.features}f_{args.vocab_max}", "model": "dlrm",
              "sharding": "table_wise", "world_size": args.world, "batch_size": args.batch,
              "embedding_dim": args.dim, "sparse_features": args.features, "dense_features": NUM_DENSE,
              "device": "cpu", "backend": "gloo", "steps": len(times["full"])}
    records = [{**common, "method": "full", "step_time_s": full_s, "samples_per_s": args.batch / full_s,
                "embedding_bytes": full_bytes, "compression": 1.0, "vs_full": 1.0},
               {**common, "method": "cel", "step_time_s": cel_s, "samples_per_s": args.batch / cel_s,
                "embedding_bytes": res["cel_bytes"], "compression": full_bytes / res["cel_bytes"],
                "clustered_tables": len(res["clusters"]), "clusters": sum(res["clusters"].values()),
                "vs_full": cel_s / full_s, "vs_full_steps_p25": q[0], "vs_full_steps_p75": q[2]}]
    print_table(records, ["method", "step_time_s", "samples_per_s", "vs_full", "vs_full_steps_p25",
                          "vs_full_steps_p75", "embedding_bytes", "compression", "clusters"])
    path = write_results("sharded_ctr", records, args=vars(args),
                         targets={"cel_step_vs_full_max": 1.15})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
