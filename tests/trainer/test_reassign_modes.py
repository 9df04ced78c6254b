"""Reassignment in bounded memory: exact streamed over cluster blocks equals the one-block
(dense) decision; CEL-Lite equals exact when its candidates cover every cluster and its recent
interactions are all the data; neither allocates an [entities x clusters] matrix."""
import copy

import pytest
import torch

from cel_torchrec.algorithm import decide_reassignment
from tests.trainer.test_phases import ENV, NoLinearForm, _batches, setup
from cel_torchrec.phases import (exact_proposal, lite_proposal, reassign_losses, run_reassignment)


def _plan(emb, model, data, **kw):
    emb = copy.deepcopy(emb)
    plan, rep = run_reassignment(emb, model, lambda: _batches(data), "item", loss="mse", env=ENV,
                                 keep_prob=0.3, generator=torch.Generator().manual_seed(5),
                                 optimizer=None, **kw)
    return plan, rep


@pytest.mark.parametrize("model_name", ["mf", "neumf"])
def test_exact_streamed_over_cluster_blocks_equals_the_dense_decision(model_name):
    emb, model, data = setup(model_name, seed=7, items=40, clusters=5)
    emb.eval()
    seen, dense = reassign_losses(emb, model, _batches(data), "item", "mse", ENV)
    st = emb.cluster_states["item"]
    want = decide_reassignment(st.assignment, st.num_active, seen, dense, keep_prob=0.3,
                               generator=torch.Generator().manual_seed(5))
    n = st.num_entities
    for budget in (8 * n * 1, 8 * n * 2, 1 << 30):          # blocks of 1, 2 and all clusters
        s, best, gain, counts, _, _ = exact_proposal(emb, model, lambda: _batches(data), "item",
                                                  "mse", ENV, memory_bytes=budget)
        assert torch.equal(s, seen) and torch.equal(best, dense.argmin(1))
        old = st.assignment.long()[seen]
        assert torch.allclose(gain, dense.gather(1, old[:, None])[:, 0] - dense.min(1).values)
        plan, _ = _plan(emb, model, data, memory_bytes=budget)
        assert torch.equal(plan.new_assignment, want.new_assignment), budget


@pytest.mark.parametrize("model_name", ["mf", "two_tower"])
def test_lite_equals_exact_when_candidates_cover_every_cluster(model_name):
    emb, model, data = setup(model_name, seed=8, items=40, clusters=5)
    exact, _ = _plan(emb, model, data, mode="exact")
    recent = list(_batches(data))                    # "since the last reassignment": all data
    lite, rep = _plan(emb, model, data, mode="lite", recent=recent, lite_k=5)
    assert rep.detail["mode"] == "lite"
    assert torch.equal(lite.new_assignment, exact.new_assignment)
    if model_name == "mf":                           # generic forward path agrees too
        lite2, _ = _plan(emb, NoLinearForm(model), data, mode="lite", recent=recent, lite_k=5)
        assert torch.equal(lite2.new_assignment, exact.new_assignment)


def test_lite_scores_the_same_from_its_first_pass_cache_as_from_fresh_lookups():
    """MF keeps each sample's `(x, const)` from the first pass; with no cache (`cache_bytes=0`)
    or a cache for only the first batch, the second pass looks the batches up again: same
    proposal, to float32 rounding."""
    emb, model, data = setup("mf", seed=10, items=40, clusters=5)
    recent = list(_batches(data, size=16))
    assert len(recent) >= 3
    emb.eval()
    full = lite_proposal(emb, model, recent, "item", "mse", ENV, k=3)
    width = 16 * (emb.cluster_rows("item").shape[1] + 2) * 4
    for budget in (0, width):
        other = lite_proposal(emb, model, recent, "item", "mse", ENV, k=3, cache_bytes=budget)
        for a, b in zip(full[:4], other[:4]):
            assert torch.allclose(a.double(), b.double(), atol=1e-5), budget
        assert torch.equal(full[1], other[1])


def test_lite_only_moves_recently_seen_entities_to_one_of_their_candidates():
    emb, model, data = setup("mf", seed=9, items=40, clusters=5)
    u, i, y = data
    recent = list(_batches((u[:20], i[:20], y[:20])))
    seen, best, gain, counts, _ = lite_proposal(emb, model, recent, "item", "mse", ENV, k=2)
    assert torch.equal(seen, torch.unique(i[:20]))
    assert (gain >= -1e-9).all() and int(counts.sum()) == 20
    plan, _ = _plan(emb, model, data, mode="lite", recent=recent, lite_k=2)
    old = emb.cluster_states["item"].assignment
    moved = (plan.new_assignment != old).nonzero().flatten()
    assert set(moved.tolist()) <= set(seen.tolist())


def _largest_allocation(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_reassignment_memory_is_bounded_at_scale():
    """1e6 entities x 1e3 clusters scaled down by 100 on each side: 1e4 entities x 256 clusters
    (the dense matrix would be 20 MB). Exact with a 1 MiB budget and Lite both stay far below."""
    torch.manual_seed(0)
    from tests.trainer.test_phases import ClusteredEmbeddingBagCollection, ClusteringConfig
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from trainer.config import ModelConfig
    from trainer.models import build_model, embedding_dim_for
    n_items, n_users, m = 10_000, 500, 256
    mcfg = ModelConfig(name="mf", embedding_dim=7)
    dim = embedding_dim_for(mcfg)
    tables = [EmbeddingBagConfig(name="user", embedding_dim=dim, num_embeddings=n_users, feature_names=["user_id"]),
              EmbeddingBagConfig(name="item", embedding_dim=dim, num_embeddings=n_items, feature_names=["item_id"])]
    emb = ClusteredEmbeddingBagCollection(tables, {"item": ClusteringConfig(max_clusters=m)})
    st = emb.cluster_states["item"]
    st.assignment.copy_(torch.arange(n_items, dtype=torch.int32) % m)
    st.num_active = m
    model = build_model(mcfg, seed=0)
    n = 20_000
    data = (torch.randint(0, n_users, (n,)), torch.randint(0, n_items, (n,)),
            torch.randint(1, 6, (n,)).float())
    dense_bytes = n_items * m * 8
    budget = 1 << 20
    peak_exact = _largest_allocation(lambda: exact_proposal(
        emb, model, lambda: _batches(data, size=4096), "item", "mse", ENV, memory_bytes=budget))
    peak_lite = _largest_allocation(lambda: lite_proposal(
        emb, model, list(_batches(data, size=4096)), "item", "mse", ENV, k=8))
    assert peak_exact <= budget + 65536, peak_exact
    print(f"largest allocation: exact {peak_exact:,} B, lite {peak_lite:,} B, dense {dense_bytes:,} B")
    assert peak_lite < dense_bytes / 8, peak_lite


def test_min_gain_keeps_exactly_the_movers_whose_gain_is_below_the_threshold():
    """`min_gain` is relative to the mean loss per interaction: an entity whose argmin saves no
    more than `min_gain x mean_loss` keeps its cluster; damping off, so the rest all move."""
    emb, model, data = setup("mf", seed=11, items=40, clusters=5)
    s, best, gain, counts, _, mean_loss = exact_proposal(emb, model, lambda: _batches(data),
                                                         "item", "mse", ENV)
    old = emb.cluster_states["item"].assignment.long()[s]
    movers = best != old
    assert int(movers.sum()) >= 4 and mean_loss > 0
    # a threshold between the movers' smallest and largest gains
    rel = float(gain[movers].median()) / mean_loss
    plans = {}
    for mg in (0.0, rel, 1e9):
        e = copy.deepcopy(emb)
        plans[mg], rep = run_reassignment(e, model, lambda: _batches(data), "item", loss="mse",
                                          env=ENV, keep_prob=0.0,
                                          generator=torch.Generator().manual_seed(5),
                                          optimizer=None, min_gain=mg)
        assert rep.detail["kept_below_min_gain"] == plans[mg].num_kept_below_min_gain
    assert plans[0.0].num_kept_below_min_gain == 0
    assert plans[1e9].num_kept_below_min_gain == int(movers.sum())
    assert plans[1e9].num_moved == 0
    small = movers & (gain <= rel * mean_loss)
    assert plans[rel].num_kept_below_min_gain == int(small.sum()) > 0
    new = plans[rel].new_assignment.long()[s]
    assert torch.equal(new[small], old[small])            # low-gain movers stay
    big = movers & ~small
    assert plans[rel].num_kept_to_avoid_empty == 0 and plans[rel].row_dst.numel() == 0
    assert torch.equal(new[big], best[big])               # the others take their argmin
