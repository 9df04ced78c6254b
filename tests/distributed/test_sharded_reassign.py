"""Bounded-memory reassignment on 2 gloo ranks: exact (streamed over cluster blocks, losses
reduced to each entity's owner rank) and CEL-Lite (each rank scores its own recent batches)
give the unsharded oracle's map, bitwise identical on both ranks."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.dist

USERS, ITEMS, DIM, CAP, BATCH = 50, 40, 8, 6, 32


class Dot(torch.nn.Module):
    """A dot-product model without `linear_form` (the generic candidate-forward path)."""

    def forward(self, embs, dense=None):
        return (embs["user_id"] * embs["item_id"]).sum(1)


class LinearDot(Dot):
    """The same model with `linear_form`: CEL-Lite's closed-form gradient and first-pass cache."""

    def linear_form(self, embs, dense, feature):
        other = embs["user_id" if feature == "item_id" else "item_id"]
        return other, torch.zeros(other.shape[0])


def _batches(n):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    out = []
    for s in range(n):
        g = torch.Generator().manual_seed(500 + s)
        u, i = torch.randint(0, USERS, (BATCH,), generator=g), torch.randint(0, ITEMS, (BATCH,), generator=g)
        y = torch.randn(BATCH, generator=g)
        out.append((u, i, y))
    def kjt(u, i):
        return KeyedJaggedTensor.from_lengths_sync(keys=["user_id", "item_id"], values=torch.cat([u, i]),
                                                   lengths=torch.ones(2 * u.numel(), dtype=torch.long))
    return out, kjt


def _worker(rank, world):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from cel_torchrec.distributed import clustered_modules, load_unsharded_state, shard_model
    from cel_torchrec.distributed import collectives as C
    from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig
    from trainer.dist import DistEnv
    from cel_torchrec.phases import run_reassignment

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="user", embedding_dim=DIM, num_embeddings=USERS, feature_names=["user_id"]),
              EmbeddingBagConfig(name="item", embedding_dim=DIM, num_embeddings=ITEMS, feature_names=["item_id"])]
    oracle = ClusteredEmbeddingBagCollection(tables, {"item": ClusteringConfig(max_clusters=CAP, init_clusters=CAP)})
    with torch.no_grad():
        for p in oracle.parameters():
            p.normal_()
    dmp = shard_model(copy.deepcopy(oracle), sharding_type="table_wise",
                      fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.01})
    (_, sharded), = clustered_modules(dmp).items()
    load_unsharded_state(dmp, oracle.state_dict())
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    solo = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    data, kjt = _batches(4)
    half = BATCH // world
    mine = slice(rank * half, (rank + 1) * half)
    local = [(kjt(u[mine], i[mine]), None, y[mine], True) for u, i, y in data]
    full = [(kjt(u, i), None, y) for u, i, y in data]
    results = {}
    # Lite with the linear path: rank 0 has one batch more (at position 0: rank 1 pads it) and
    # the first-pass cache holds two positions, so the second pass mixes cached positions, a
    # padding batch at a cached position and looked-up positions on both ranks
    extra, _ = _batches(5)
    extra_b = extra[4]
    lin_local = ([(kjt(extra_b[0][mine], extra_b[1][mine]), None, extra_b[2][mine], True)] if rank == 0
                 else [(kjt(extra_b[0][:0], extra_b[1][:0]), None, extra_b[2][:0], False)]) + local
    lin_full = [(kjt(extra_b[0][:half], extra_b[1][:half]), None, extra_b[2][:half])] + full
    cache = 2 * half * (DIM + 4) * 4       # two positions of (x, const, label, id) per id
    for mode, kw, model, loc, glob in (
            ("exact", {"memory_bytes": 8 * ITEMS * 2}, Dot(), local, full),
            ("lite", {"lite_k": 2}, Dot(), local, full),
            ("lite_linear", {"lite_k": 2, "lite_cache_bytes": cache}, LinearDot(), lin_local, lin_full),
            ("lite_linearised", {"lite_k": 2, "lite_cache_bytes": cache, "lite_scoring": "linearised"},
             Dot(), lin_local, lin_full)):
        full_b, local_b = glob, loc
        o, s = copy.deepcopy(oracle), sharded
        before = s.cluster_states["item"].assignment.clone()
        kind = mode.split("_")[0]
        run_reassignment(o, model, lambda: iter(full_b), "item", loss="mse", env=solo,
                         keep_prob=0.31, generator=torch.Generator().manual_seed(3), optimizer=None,
                         mode=kind, recent=full_b, **kw)
        run_reassignment(s, model, lambda: iter(local_b), "item", loss="mse", env=env,
                         keep_prob=0.31, generator=torch.Generator().manual_seed(3), optimizer=None,
                         mode=kind, recent=local_b, **kw)
        got = s.cluster_states["item"].assignment
        assert C.replicas_equal(got), mode
        assert torch.equal(got, o.cluster_states["item"].assignment), mode
        results[mode] = int((got != before).sum())
        s.cluster_states["item"].assignment.copy_(before)      # same start for the next mode
    return results


def test_sharded_exact_and_lite_reassignment_match_the_oracle_on_every_rank():
    results = run_ranks(_worker)
    assert results[0] == results[1]
    assert results[0]["exact"] > 0 and results[0]["lite"] > 0 and results[0]["lite_linear"] > 0
    assert results[0]["lite_linearised"] > 0
