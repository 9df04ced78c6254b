"""Sharded CEL against the unsharded ClusteredEmbeddingBagCollection as an oracle, on 2 gloo CPU
processes, for each sharding type of the cluster tables: same outputs and same cluster tables
after steps that include a split and a reassignment; replicated maps identical on every rank;
row copies (with fused optimizer state) across ranks; checkpoint resume; unsharded export.

One 2-rank run per sharding type runs all checks (torchrec's import costs seconds); each
behaviour then passes or fails under its own test name (`BEHAVIOURS`)."""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch

from tests.conftest import user_item_kjt, user_item_tables
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.dist

USERS, ITEMS, DIM, CAP = 50, 40, 8, 6
GLOBAL_BATCH, STEPS, LR = 32, 9, 0.05
TOL = dict(atol=1e-5, rtol=1e-5)


def _tables():
    return user_item_tables(USERS, ITEMS, DIM)


def _oracle():
    from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig
    torch.manual_seed(0)
    return ClusteredEmbeddingBagCollection(_tables(), {
        "user": ClusteringConfig(max_clusters=CAP, init_clusters=2, grad_average="members"),
        "item": ClusteringConfig(max_clusters=CAP, init_clusters=1, grad_average="batch")}, seed=0)


_kjt = user_item_kjt


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    users = torch.randint(0, USERS, (GLOBAL_BATCH,), generator=g)
    items = torch.randint(0, ITEMS, (GLOBAL_BATCH,), generator=g)
    label = torch.randn(GLOBAL_BATCH, generator=g)
    return users, items, label


def _predict(out):
    d = out.to_dict()
    return (d["user_id"] * d["item_id"]).sum(1)


def _mf_losses(emb, table, batches, gathered_rows, reduce):
    """Exact loss of every entity of `table` under every active cluster (closed form for the dot
    product), from this rank's share of `batches`, summed over ranks."""
    from cel_torchrec.algorithm import mf_loss_matrix, mf_sufficient_stats
    from cel_torchrec.distributed import collectives as C
    feature, other = ("item_id", "user_id") if table == "item" else ("user_id", "item_id")
    n = emb.cluster_states[table].num_entities
    s_rr, s_rx = torch.zeros(n, dtype=torch.float64), torch.zeros(n, DIM, dtype=torch.float64)
    s_xx, counts = torch.zeros(n, DIM, DIM, dtype=torch.float64), torch.zeros(n, dtype=torch.int64)
    for users, items, label in batches:
        ids = {"user_id": users, "item_id": items}
        with torch.no_grad():
            out = emb(_kjt(users, items)).to_dict()
        a, b, c = mf_sufficient_stats(out[other], label, ids[feature], n)
        s_rr += a
        s_rx += b
        s_xx += c
        counts.index_add_(0, ids[feature], torch.ones_like(ids[feature]))
    if reduce:
        C.all_reduce_sum_many_([s_rr, s_rx, s_xx, counts])
    seen = (counts > 0).nonzero().flatten()
    return seen, mf_loss_matrix(s_rr[seen], s_rx[seen], s_xx[seen], gathered_rows)


# what the oracle worker checks; each behaviour passes or fails under its own test name
BEHAVIOURS = ["placement", "tables_match", "forward_matches", "split_candidates", "split_plan",
              "maps_replicated", "counters", "reassignment_losses", "reassignment_plan",
              "copy_rows", "embedding_bytes", "checkpoint_round_trip", "unsharded_export",
              "fused_state_copy"]


class _Checks:
    """Per behaviour: "ok", the first failure's message, or "not reached". Every collective
    runs outside the checked blocks, so a failed assertion on one rank never leaves the other
    waiting in a collective."""

    def __init__(self):
        self.result = {name: "not reached" for name in BEHAVIOURS}
        self._failed: set[str] = set()

    @contextlib.contextmanager
    def expect(self, name: str):
        assert name in self.result, name
        try:
            yield
        except AssertionError as exc:
            if name not in self._failed:
                self._failed.add(name)
                self.result[name] = f"AssertionError: {exc}"[:3000]
        else:
            if name not in self._failed:
                self.result[name] = "ok"


def _worker(rank, world, sharding_type, ckpt_dir):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    from cel_torchrec.algorithm import decide_reassignment
    from cel_torchrec.distributed import (clustered_modules, export_unsharded_state,
                                          load_checkpoint, load_unsharded_state, save_checkpoint,
                                          shard_model)
    from cel_torchrec.distributed import collectives as C
    from cel_torchrec.modules import ClusteredEmbeddingBagCollection

    checks = _Checks()
    oracle = _oracle()
    oracle.train()
    dmp = shard_model(copy.deepcopy(oracle), sharding_type=sharding_type,
                      fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR})
    (name, sharded), = clustered_modules(dmp).items()
    load_unsharded_state(dmp, oracle.state_dict())
    _check_placement(checks, sharded, sharding_type, rank, world)
    dmp.train()
    opt = torch.optim.SGD(oracle.parameters(), lr=LR)
    half = GLOBAL_BATCH // world
    mine = slice(rank * half, (rank + 1) * half)

    def check_maps(where):
        replicated = {t: C.replicas_equal(sharded.cluster_states[t].assignment)
                      for t in ("user", "item")}                         # collectives first
        with checks.expect("maps_replicated"):
            for table in ("user", "item"):
                a = sharded.cluster_states[table].assignment
                assert torch.equal(a, oracle.cluster_states[table].assignment), (where, table)
                assert replicated[table], (where, table)
                assert sharded.cluster_states[table].num_active == oracle.cluster_states[table].num_active
            users, items, _ = _batch(0)
            got, want = sharded.remap(_kjt(users, items)), oracle.remap(_kjt(users, items))
            assert torch.equal(got.values(), want.values()), where

    def check_tables(where, behaviour="tables_match"):
        full = {t: sharded.gather_table(t) for t in ("user", "item")}   # collectives first
        with checks.expect(behaviour):
            for table in ("user", "item"):
                torch.testing.assert_close(full[table], oracle.table_weight(table).detach(), **TOL,
                                           msg=f"{where}: {table} table")

    def train_step(step):
        users, items, label = _batch(step)
        pred = _predict(dmp(_kjt(users[mine], items[mine])))
        # TorchRec divides sparse gradients by the world size (like DDP's averaging), so each
        # rank's loss is the mean over its own share: the sum of the updates is the oracle's
        loss = ((pred - label[mine]) ** 2).mean()
        loss.backward()                              # fused EXACT_SGD updates the shards here
        sharded.observe_losses(((pred - label[mine]) ** 2).detach())
        ref = _predict(oracle(_kjt(users, items)))
        ref_loss = ((ref - label) ** 2).sum() / GLOBAL_BATCH
        opt.zero_grad()
        ref_loss.backward()
        opt.step()
        oracle.observe_losses(((ref - label) ** 2).detach())
        with checks.expect("forward_matches"):
            torch.testing.assert_close(pred.detach(), ref.detach()[mine], **TOL, msg=f"step {step}")

    check_tables("start")
    for step in range(STEPS):
        if step == 1:
            for table in ("user", "item"):
                got = sharded.begin_split_window(table)
                want = oracle.begin_split_window(table)
                with checks.expect("split_candidates"):
                    assert torch.equal(got, want), (table, got, want)
        if step == 4:
            for table in ("user", "item"):
                p = sharded.split(table)
                q = oracle.split(table, optimizer=opt)
                with checks.expect("split_plan"):
                    assert torch.equal(p.parents, q.parents) and torch.equal(p.children, q.children)
                    assert p.num_splits == 1, (table, p)
            check_maps("after split")
            check_tables("after split")
            sharded.sync_statistics()                # counters are summed lazily
            with checks.expect("counters"):
                for table in ("user", "item"):
                    assert torch.equal(sharded.cluster_states[table].entity_interactions,
                                       oracle.cluster_states[table].entity_interactions)
        if step == 7:
            batches = [_batch(s) for s in range(3)]
            for table in ("item", "user"):
                rows = sharded.cluster_rows(table)
                local = [(u[mine], i[mine], y[mine]) for u, i, y in batches]
                seen, losses = _mf_losses(sharded, table, local, rows, reduce=True)
                seen_o, losses_o = _mf_losses(oracle, table, batches, oracle.cluster_rows(table), reduce=False)
                with checks.expect("reassignment_losses"):
                    torch.testing.assert_close(rows, oracle.cluster_rows(table), **TOL)
                    assert torch.equal(seen, seen_o)
                    torch.testing.assert_close(losses, losses_o, atol=1e-6, rtol=1e-6)
                state = sharded.cluster_states[table]
                plan = decide_reassignment(state.assignment, state.num_active, seen, losses,
                                           keep_prob=0.31, generator=torch.Generator().manual_seed(7))
                plan_o = decide_reassignment(oracle.cluster_states[table].assignment, state.num_active,
                                             seen_o, losses_o, keep_prob=0.31,
                                             generator=torch.Generator().manual_seed(7))
                with checks.expect("reassignment_plan"):
                    assert torch.equal(plan.new_assignment, plan_o.new_assignment)
                sharded.apply_reassignment(table, plan)
                oracle.apply_reassignment(table, plan_o, optimizer=opt)
            check_maps("after reassignment")
        train_step(step)
    check_tables("end")
    check_maps("end")

    # a row copy whose source and destination may live on different ranks (row-wise)
    sharded.copy_rows("item", torch.tensor([0, 1]), torch.tensor([CAP - 1, CAP - 2]))
    oracle.copy_rows("item", torch.tensor([0, 1]), torch.tensor([CAP - 1, CAP - 2]))
    check_tables("after copy_rows", "copy_rows")
    with checks.expect("embedding_bytes"):
        assert sharded.embedding_bytes() == oracle.embedding_bytes()

    # checkpoint: save, change weights and maps, load, identical predictions
    users, items, _ = _batch(99)
    dmp.eval()
    with torch.no_grad():
        before = _predict(dmp(_kjt(users[mine], items[mine])))
    save_checkpoint(dmp, ckpt_dir)
    dmp.train()
    train_step(100)
    sharded.begin_split_window("item")
    train_step(101)
    sharded.split("item")
    dmp.eval()
    with torch.no_grad():
        changed = _predict(dmp(_kjt(users[mine], items[mine])))
    load_checkpoint(dmp, ckpt_dir)
    with torch.no_grad():
        after = _predict(dmp(_kjt(users[mine], items[mine])))
    num_active_after_load = sharded.cluster_states["item"].num_active
    replicated = C.replicas_equal(sharded.cluster_states["item"].assignment)
    with checks.expect("checkpoint_round_trip"):
        assert not torch.allclose(changed, before)
        assert torch.equal(after, before)
        assert replicated

    # unsharded export (another world size: here 1 process) gives the same predictions
    state = export_unsharded_state(dmp)
    single = ClusteredEmbeddingBagCollection(
        _tables(), {t: oracle.clustering_config(t) for t in oracle.clustered_tables})
    single.load_state_dict(state)
    single.eval()
    with torch.no_grad():
        full_pred = _predict(single(_kjt(users, items)))
    with checks.expect("unsharded_export"):
        torch.testing.assert_close(full_pred[mine], before, **TOL)
    _check_fused_state_copy(checks, rank, world, sharding_type, ckpt_dir + "_adagrad")
    return {"checks": checks.result, "num_active_after_load": num_active_after_load}


def _check_placement(checks, sharded, sharding_type, rank, world):
    """The planner really placed the cluster tables as asked."""
    from cel_torchrec.distributed import collectives as C
    for table in ("user", "item"):
        shards = sharded.local_shards(table)
        rows_total = CAP
        held = torch.tensor([sum(s.rows * s.cols for s in shards)])
        C.all_reduce_sum_(held)
        with checks.expect("placement"):
            assert int(held) == rows_total * DIM, (table, int(held))     # every element exactly once
            if sharding_type == "column_wise":
                assert [(s.rows, s.cols, s.col_offset) for s in shards] == [(CAP, DIM // world, rank * DIM // world)]
            elif sharding_type == "row_wise":
                assert [(s.rows, s.cols, s.row_offset) for s in shards] == [(CAP // world, DIM, rank * CAP // world)]
            else:
                assert all((s.rows, s.cols) == (CAP, DIM) for s in shards)


def _check_fused_state_copy(checks, rank, world, sharding_type, ckpt_dir):
    """With a stateful fused optimizer, split and copy_rows carry the parent's optimizer state
    into the child row (across ranks for row-wise), and checkpoints restore that state."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    from cel_torchrec.distributed import (clustered_modules, export_unsharded_state,
                                          load_checkpoint, save_checkpoint, shard_model)
    optim = EmbOptimType.EXACT_ADAGRAD if sharding_type == "column_wise" else EmbOptimType.EXACT_ROWWISE_ADAGRAD
    dmp = shard_model(_oracle(), sharding_type=sharding_type,
                      fused_params={"optimizer": optim, "learning_rate": 0.1, "eps": 1e-8})
    (_, sharded), = clustered_modules(dmp).items()
    dmp.train()
    half = GLOBAL_BATCH // world
    mine = slice(rank * half, (rank + 1) * half)
    for step in range(2):
        users, items, label = _batch(step)
        pred = _predict(dmp(_kjt(users[mine], items[mine])))
        ((pred - label[mine]) ** 2).mean().backward()
    state0 = sharded.gather_table("item", state_index=0)
    src, dst = torch.tensor([0]), torch.tensor([CAP - 1])  # first and last rows (two ranks if row-wise)
    sharded.copy_rows("item", src, dst)
    state1 = sharded.gather_table("item", state_index=0)
    weights = sharded.gather_table("item")
    save_checkpoint(dmp, ckpt_dir)
    users, items, label = _batch(5)
    pred = _predict(dmp(_kjt(users[mine], items[mine])))
    ((pred - label[mine]) ** 2).mean().backward()
    trained_on = sharded.gather_table("item", state_index=0)
    load_checkpoint(dmp, ckpt_dir)
    restored = sharded.gather_table("item", state_index=0)
    exported = export_unsharded_state(dmp, with_optimizer=True)
    with checks.expect("fused_state_copy"):
        assert state0[0].abs().sum() > 0                       # cluster 0 has been trained
        assert torch.equal(state1[CAP - 1], state0[0]) and torch.equal(weights[CAP - 1], weights[0])
        assert not torch.equal(trained_on, state1)
        assert torch.equal(restored, state1)
        assert torch.equal(exported["_embedding_bag_collection.embedding_bags.item.weight"], weights)
        assert exported["optimizer"], "fused optimizer state exported"


@pytest.fixture(scope="module", params=["table_wise", "column_wise", "row_wise"])
def oracle_run(request, tmp_path_factory):
    """One 2-rank run of every check per sharding type (torchrec's import costs seconds)."""
    ckpt = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    return run_ranks(_worker, request.param, str(ckpt / "ckpt"))


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_sharded_matches_unsharded_oracle(oracle_run, behaviour):
    for rank, result in enumerate(oracle_run):
        assert result["checks"][behaviour] == "ok", f"rank {rank}: {result['checks'][behaviour]}"


def test_sharded_oracle_ranks_agree(oracle_run):
    assert oracle_run[0]["num_active_after_load"] == oracle_run[1]["num_active_after_load"]


def _global_counts_worker(rank, world):
    """Distinct members per cluster of the global batch when the ranks' batches differ in size
    and overlap: the one padded all-gather (bound = largest per-rank batch) and the two-collective
    fallback both equal a brute force over the concatenated batch."""
    from cel_torchrec.distributed.sharded_clustered_ebc import _GlobalDistinctMembers
    from cel_torchrec.modules.clustered_ebc import ClusterRemapper
    from cel_torchrec.modules import ClusteringConfig
    remapper = ClusterRemapper(_tables(), {"user": ClusteringConfig(max_clusters=CAP, init_clusters=3),
                                           "item": ClusteringConfig(max_clusters=CAP, init_clusters=4)})
    g = torch.Generator().manual_seed(5)
    sizes = [16, 10]                                    # unequal local batches
    users = [torch.randint(0, USERS, (n,), generator=g) for n in sizes]
    items = [torch.randint(0, ITEMS, (n,), generator=g) for n in sizes]
    _, features = remapper.remap(_kjt(users[rank], items[rank]))
    got = []
    for bound in (max(sizes), None):
        counts = _GlobalDistinctMembers(features, remapper.states, None)
        counts.gather(bound)
        got.append(counts.counts())
    want = {}
    for key, table, ids in (("user_id", "user", torch.cat(users)), ("item_id", "item", torch.cat(items))):
        assignment = remapper.states[table].assignment.long()
        want[key] = torch.bincount(assignment[torch.unique(ids)], minlength=CAP)
    for counts in got:
        assert set(counts) == set(want)
        for key in want:
            assert torch.equal(counts[key], want[key]), (key, counts[key], want[key])
    scale = _GlobalDistinctMembers(features, remapper.states, None)
    scale.gather(max(sizes))
    item = next(f for f in features if f.key == "item_id")
    assert torch.equal(scale.grad_scale("item_id", item.cluster_ids),
                       1.0 / want["item_id"][item.cluster_ids].float())
    return True


def test_global_batch_distinct_members_with_unequal_rank_batches():
    assert run_ranks(_global_counts_worker) == [True, True]
