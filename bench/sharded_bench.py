"""Sharded CEL vs a sharded full-table EBC on 2 gloo CPU processes, side by side.

    python -m bench.sharded_bench [--users 100000 --items 50000 --dim 32 --batch 4096 ...]

Same interaction model for both (dot product of the user and item embeddings, MSE), same global
batch, same sharding (table_wise) and fused optimizer (EXACT_SGD). Measures the median step time
(forward + backward + fused update), the cost of the remap alone, and of one split phase (window
reduce + GPCA + row copy + next window) relative to an epoch of `--epoch-interactions`. Prints a
table and writes bench/results/sharded.json.
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


# (grad_average, batch_scope) of the CEL variants measured
VARIANTS = (("members", "global"), ("batch", "global"), ("batch", "local"))


def _kjt(users, items):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id"], values=torch.cat([users, items]),
        lengths=torch.ones(users.numel() + items.numel(), dtype=torch.long))


def _tables(args):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    return [EmbeddingBagConfig(name="user", embedding_dim=args.dim, num_embeddings=args.users,
                               feature_names=["user_id"]),
            EmbeddingBagConfig(name="item", embedding_dim=args.dim, num_embeddings=args.items,
                               feature_names=["item_id"])]


def _batches(args, rank, world, n):
    g = torch.Generator().manual_seed(rank)
    local = args.batch // world
    out = []
    for _ in range(n):
        users = torch.randint(0, args.users, (local,), generator=g)
        items = (torch.rand(local, generator=g) ** 2 * args.items).long()   # skewed popularity
        out.append((_kjt(users, items), users, items, torch.randn(local, generator=g)))
    return out


def _time_steps(model, batches, warmup):
    times = []
    for i, (kjt, _, _, label) in enumerate(batches):
        dist.barrier()
        t0 = time.perf_counter()
        out = model(kjt).to_dict()
        pred = (out["user_id"] * out["item_id"]).sum(1)
        ((pred - label) ** 2).mean().backward()
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _worker(rank, world, port, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from cel_torchrec.distributed import clustered_modules, shard_model
    from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig

    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.01}
    batches = _batches(args, rank, world, args.steps)
    torch.manual_seed(0)
    models = {"full": shard_model(EmbeddingBagCollection(tables=_tables(args)),
                                  sharding_type="table_wise", fused_params=fused)}
    for mode, scope in VARIANTS:
        torch.manual_seed(0)
        clustering = {t: ClusteringConfig(max_clusters=args.clusters, init_clusters=args.clusters // 2,
                                          grad_average=mode) for t in ("user", "item")}
        models[f"cel_{mode}_{scope}"] = shard_model(
            ClusteredEmbeddingBagCollection(_tables(args), clustering), sharding_type="table_wise",
            fused_params=fused, batch_scope=scope)
    for name, model in models.items():
        model.train()
        for (_, sharded) in clustered_modules(model).items():
            sharded.begin_split_window("item")     # record window gradients, as in training
        _time_steps(model, batches[:args.warmup], args.warmup)
    # interleave the models in rounds so that drift of the shared machine hits all alike
    results = {name: [] for name in models}
    chunk = max(1, args.steps // args.rounds)
    for r in range(args.rounds):
        for name, model in models.items():
            part = batches[(r * chunk) % len(batches):][:chunk]
            results[name] += _time_steps(model, part, 0)
    (_, sharded), = clustered_modules(models["cel_batch_global"]).items()
    remap = []
    for kjt, *_ in batches:
        t0 = time.perf_counter()
        sharded.remap(kjt)
        remap.append(time.perf_counter() - t0)
    results["remap"] = remap
    dist.barrier()
    t0 = time.perf_counter()
    plan = sharded.split("item")
    sharded.begin_split_window("item")
    dist.barrier()
    results["split"] = [time.perf_counter() - t0]
    results["split_num"] = plan.num_splits
    results["cel_bytes"] = sharded.embedding_bytes()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4096, help="global batch (split over ranks)")
    p.add_argument("--steps", type=int, default=400, help="timed steps per model")
    p.add_argument("--rounds", type=int, default=400,
                   help="interleaved rounds over the models (= steps: one step of each model in "
                        "turn, so the shared machine's drift hits all alike; coarser rounds of "
                        "5 steps gave CEL/full medians from 1.01 to 1.25 between runs)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--epoch-interactions", type=int, default=1_000_209,
                   help="interactions in an epoch (default: MovieLens-1M)")
    args = p.parse_args(argv)
    from bench.common import print_table, write_results

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(args.world, port, args, out_dir), nprocs=args.world,
                           join=True, start_method="spawn")
        res = torch.load(os.path.join(out_dir, "rank0.pt"), weights_only=False)

    full_s = statistics.median(res["full"])
    steps_per_epoch = -(-args.epoch_interactions // args.batch)
    common = {"dataset": f"synthetic_{args.users}u_{args.items}i", "model": "mf_dot",
              "sharding": "table_wise", "world_size": args.world, "batch_size": args.batch,
              "embedding_dim": args.dim, "device": "cpu", "backend": "gloo"}
    records = [{**common, "method": "full", "step_time_s": full_s,
                "samples_per_s": args.batch / full_s,
                "embedding_bytes": (args.users + args.items) * args.dim * 4, "vs_full": 1.0}]
    chunk = max(1, args.steps // args.rounds)

    def round_ratios(name):
        """CEL/full median step time within each interleaved round: the spread of these is how
        much the shared machine's drift moves the ratio."""
        cel, full = res[name], res["full"]
        return [statistics.median(cel[i:i + chunk]) / statistics.median(full[i:i + chunk])
                for i in range(0, min(len(cel), len(full)), chunk)]

    for mode, scope in VARIANTS:
        name = f"cel_{mode}_{scope}"
        t = statistics.median(res[name])
        q = statistics.quantiles(round_ratios(name), n=4) if args.rounds >= 4 else [None] * 3
        records.append({**common, "method": "cel", "grad_average": mode,
                        "batch_scope": scope if mode == "batch" else "",
                        "user_clusters": args.clusters, "item_clusters": args.clusters,
                        "step_time_s": t, "samples_per_s": args.batch / t,
                        "embedding_bytes": res["cel_bytes"], "vs_full": t / full_s,
                        "vs_full_rounds_p25": q[0], "vs_full_rounds_p75": q[2]})
    print_table(records, ["method", "grad_average", "batch_scope", "step_time_s", "samples_per_s", "vs_full",
                          "vs_full_rounds_p25", "vs_full_rounds_p75", "embedding_bytes"])
    remap_s = statistics.median(res["remap"])
    epoch_s = steps_per_epoch * statistics.median(res["cel_batch_global"])
    split_s = res["split"][0]
    phases = [{**common, "method": "cel", "phase": "remap", "seconds": remap_s,
               "fraction_of_step": remap_s / statistics.median(res["cel_batch_global"])},
              {**common, "method": "cel", "phase": "split", "seconds": split_s,
               "splits": res["split_num"], "epoch_s": epoch_s,
               "fraction_of_epoch": split_s / epoch_s}]
    print_table(phases, ["phase", "seconds", "fraction_of_step", "fraction_of_epoch", "epoch_s"])
    path = write_results("sharded", records + phases, args=vars(args),
                         targets={"cel_step_vs_full_max": 1.15, "split_fraction_of_epoch_max": 0.05})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
