"""Sharded CEL with multi-hot (and weighted) clustered features against the unsharded collection
fed the global batch, on 2 gloo CPU processes: bags of different lengths (empty ones included),
a table shared by two features, MEAN pooling, ranks whose batches differ in shape (one one-hot,
one multi-hot); same outputs, same cluster tables after fused SGD steps, same split windows and
split plans."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.dist

TAGS, CATS, USERS, DIM, CAP = 30, 20, 16, 4, 6
PER_RANK, STEPS, LR = 6, 6, 0.05
TOL = dict(atol=1e-5, rtol=1e-5)
CHECKS = ["forward_matches", "tables_match", "window_rows", "split_plan", "maps_match"]


def _collection(weighted):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

    from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="tag", embedding_dim=DIM, num_embeddings=TAGS,
                                 feature_names=["tags", "genres"]),
              EmbeddingBagConfig(name="cat", embedding_dim=DIM, num_embeddings=CATS,
                                 feature_names=["cats"],
                                 pooling=PoolingType.SUM if weighted else PoolingType.MEAN),
              EmbeddingBagConfig(name="user", embedding_dim=DIM, num_embeddings=USERS,
                                 feature_names=["user_id"])]
    return ClusteredEmbeddingBagCollection(tables, {
        "tag": ClusteringConfig(max_clusters=CAP, init_clusters=2, grad_average="batch"),
        "cat": ClusteringConfig(max_clusters=CAP, init_clusters=2, grad_average="members")},
        seed=0, is_weighted=weighted)


def _samples(step, rank):
    """This rank's samples at `step`: per sample (tags, genres, cats, user, label); at step 2
    rank 0's batch is one-hot everywhere (the direct path) while rank 1's is not."""
    g = torch.Generator().manual_seed(100 * step + rank)
    out = []
    for _ in range(PER_RANK):
        one_hot = step == 2 and rank == 0
        n = [1, 1, 1] if one_hot else torch.randint(0, 4, (3,), generator=g).tolist()
        out.append((torch.randint(0, TAGS, (n[0],), generator=g),
                    torch.randint(0, TAGS, (n[1],), generator=g),
                    torch.randint(0, CATS, (n[2],), generator=g),
                    torch.randint(0, USERS, (1,), generator=g),
                    torch.randn((), generator=g)))
    return out


def _kjt(samples, weighted):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    values, lengths = [], []
    for k in range(4):
        for s in samples:
            values.append(s[k])
            lengths.append(s[k].numel())
    values = torch.cat(values)
    weights = None
    if weighted:   # a fixed weight per id value: the same on every rank and in the oracle
        weights = 0.5 + (values % 5).float() / 4
    return KeyedJaggedTensor.from_lengths_sync(keys=["tags", "genres", "cats", "user_id"],
                                               values=values, lengths=torch.tensor(lengths),
                                               weights=weights)


def _predict(kt):
    d = kt.to_dict()
    return (d["tags"] * d["user_id"]).sum(1) + (d["genres"] * d["cats"]).sum(1)


def _worker(rank, world, sharding_type, weighted):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    from cel_torchrec.distributed import clustered_modules, load_unsharded_state, shard_model

    result = {name: "ok" for name in CHECKS}

    def check(name, fn):
        try:
            fn()
        except AssertionError as exc:
            if result[name] == "ok":
                result[name] = f"AssertionError: {exc}"[:2000]

    oracle = _collection(weighted)
    oracle.train()
    dmp = shard_model(copy.deepcopy(oracle), sharding_type=sharding_type,
                      fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR})
    (_, sharded), = clustered_modules(dmp).items()
    load_unsharded_state(dmp, oracle.state_dict())
    dmp.train()
    opt = torch.optim.SGD(oracle.parameters(), lr=LR)
    for step in range(STEPS):
        if step == 1:
            for table in ("tag", "cat"):
                got, want = sharded.begin_split_window(table), oracle.begin_split_window(table)
                check("window_rows", lambda: torch.testing.assert_close(got, want))
        mine = _samples(step, rank)
        everyone = [s for r in range(world) for s in _samples(step, r)]
        pred = _predict(dmp(_kjt(mine, weighted)))
        label = torch.stack([s[4] for s in mine])
        ((pred - label) ** 2).mean().backward()      # TorchRec divides by the world size
        ref = _predict(oracle(_kjt(everyone, weighted)))
        ref_label = torch.stack([s[4] for s in everyone])
        opt.zero_grad()
        (((ref - ref_label) ** 2).sum() / len(everyone)).backward()
        opt.step()
        here = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        check("forward_matches", lambda: torch.testing.assert_close(
            pred.detach(), ref.detach()[here], **TOL, msg=f"step {step}"))
        full = {t: sharded.gather_table(t) for t in ("tag", "cat", "user")}
        for t in full:
            check("tables_match", lambda: torch.testing.assert_close(
                full[t], oracle.table_weight(t).detach(), **TOL, msg=f"step {step} {t}"))
    for table in ("tag", "cat"):
        rows = sharded.window_rows(table)
        want = oracle.window_rows(table)

        def same_window():
            # each rank's loss is the mean over its own samples: its gradients are `world` times
            # the oracle's (TorchRec divides the table update by the world size)
            for what, a, b, factor in zip(("candidates", "entities", "gradients", "counts"),
                                          rows, want, (1, 1, world, 1)):
                torch.testing.assert_close(a, b * factor, **TOL, msg=f"{table} {what}")
        check("window_rows", same_window)
        p, q = sharded.split(table), oracle.split(table, optimizer=opt)
        check("split_plan", lambda: (torch.testing.assert_close(p.parents, q.parents),
                                     torch.testing.assert_close(p.moved_entities, q.moved_entities)))
        check("maps_match", lambda: torch.testing.assert_close(
            sharded.cluster_states[table].assignment, oracle.cluster_states[table].assignment))
    return result


@pytest.mark.parametrize("sharding_type,weighted", [("table_wise", False), ("row_wise", False),
                                                    ("column_wise", True)])
def test_sharded_multi_hot_matches_the_unsharded_collection(sharding_type, weighted):
    results = run_ranks(_worker, sharding_type, weighted)
    failed = {f"rank {r} {name}": msg for r, res in enumerate(results)
              for name, msg in res.items() if msg != "ok"}
    assert not failed, failed
