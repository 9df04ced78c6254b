"""Unit and property tests of the pure-torch CEL algorithm."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cel_torchrec.algorithm import (ClusterSchedule, ClusterState, accumulate_candidate_losses,
                                    apply_split, choose_clusters, cluster_grad_scale,
                                    decide_reassignment, gpca_split, mf_loss_matrix,
                                    mf_sufficient_stats, reference_reassign_points, remap_ids,
                                    scatter_entity_grads, segment_covariance)


def test_reference_schedule_points():
    s = ClusterSchedule.reference()
    assert s.reassign_points == [39, 79, 119, 199, 279, 439, 519, 679, 759]
    splits = [t for t in range(6000) if "split" in s.actions(t)]
    assert splits[0] == 10 and splits[-1] == 790 and len(splits) == 79
    assert s.actions(39) == {"reassign"} and s.actions(40) == {"split"}
    assert s.actions(1000) == frozenset()
    frozen = ClusterSchedule(split_interval=2, split_until=100, freeze_after=10)
    assert frozen.actions(8) == {"split"} and frozen.actions(12) == frozenset()
    epochs = ClusterSchedule(split_interval=1, split_until=5, reassign_at=(2, 4), unit="epoch")
    assert [sorted(epochs.actions(e)) for e in range(6)] == [
        [], ["split"], ["reassign", "split"], ["split"], ["reassign", "split"], []]
    assert reference_reassign_points(10, 100) == [9, 19, 29, 49, 69]


def test_every_rule_is_arithmetic_at_any_horizon():
    small = ClusterSchedule(split_interval=3, split_until=50, reassign_rule="every", reassign_period=7)
    brute = [t for t in range(60) if "reassign" in small.actions(t)]
    assert brute == small.reassign_points == list(range(6, 50, 7))
    assert small.last_point() == 48
    # an open-ended horizon (split until 1e12) builds no point set: O(1) memory and time
    huge = ClusterSchedule(split_interval=5, split_until=10 ** 12, reassign_rule="every", reassign_period=2)
    assert huge.actions(1) == {"reassign"} and huge.actions(10) == {"split"}
    assert huge.actions(10 ** 12 - 1) == {"reassign"} and huge.actions(10 ** 12) == frozenset()
    assert huge.last_point() == 10 ** 12 - 1


def test_remap_and_counters():
    state = ClusterState(num_entities=6, max_clusters=4, init_clusters=1)
    state.assignment.copy_(torch.tensor([0, 0, 1, 1, 1, 2], dtype=torch.int32))
    state.num_active = 3
    ids = torch.tensor([5, 2, 2, 0])
    assert remap_ids(state.assignment, ids).tolist() == [2, 1, 1, 0]
    state.count_interactions(ids)
    assert state.member_counts().tolist() == [2, 3, 1, 0]
    assert state.interaction_counts().tolist() == [1, 2, 1, 0]
    state.check_invariants()
    state.assignment[5] = 3          # an in-place write invalidates the cached member counts
    assert state.member_counts().tolist() == [2, 3, 0, 1]
    with pytest.raises(AssertionError):
        state.check_invariants()
    state.load_state_dict({**state.state_dict(),
                           "assignment": torch.tensor([0, 0, 0, 1, 1, 2], dtype=torch.int32)})
    assert state.member_counts().tolist() == [3, 2, 1, 0]


def test_counts_taken_back_keep_the_cluster_counters_current():
    state = ClusterState(num_entities=6, max_clusters=4, init_clusters=1)
    state.assignment.copy_(torch.tensor([0, 0, 1, 1, 1, 2], dtype=torch.int32))
    state.num_active = 3
    state.count_interactions(torch.tensor([5, 2, 2, 0, 3]))
    assert state.interaction_counts().tolist() == [1, 3, 1, 0]       # the cache is now fresh
    state.count_interactions(torch.tensor([2, 5]), sign=-1)
    assert state.entity_interactions.tolist() == [1, 0, 1, 1, 0, 0]
    key = state._interactions_key
    assert state.interaction_counts().tolist() == [1, 2, 0, 0]
    assert state._interactions_key == key                            # updated, not rebuilt
    with pytest.raises(ValueError, match="more interactions than an entity holds"):
        state.count_interactions(torch.tensor([0, 0]), sign=-1)
    assert state.entity_interactions.tolist() == [1, 0, 1, 1, 0, 0]  # refused as a whole
    assert state.interaction_counts().tolist() == [1, 2, 0, 0]
    with pytest.raises(ValueError, match="sign"):
        state.count_interactions(torch.tensor([0]), sign=2)


def test_init_clusters_balanced_and_nonempty():
    g = torch.Generator().manual_seed(0)
    state = ClusterState(num_entities=103, max_clusters=10, init_clusters=7, generator=g)
    counts = state.member_counts()[:7]
    assert int(counts.min()) >= 14 and int(counts.sum()) == 103
    state.check_invariants()


def test_grad_scale_matches_formula():
    entity = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])
    assignment = torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32)   # cluster 0: {0,1}; 1: {2,3,4}
    cluster = remap_ids(assignment, entity)
    members = torch.bincount(assignment.long(), minlength=3)
    s_members = cluster_grad_scale(entity, cluster, members, "members")
    assert torch.allclose(s_members, torch.tensor([1 / 2, 1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3]))
    s_batch = cluster_grad_scale(entity, cluster, members, "batch")
    # cluster 0 has entities {0,1} in batch; cluster 1 has {2,3,4}
    assert torch.allclose(s_batch, torch.tensor([1 / 2, 1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3]))
    s_batch2 = cluster_grad_scale(entity[:4], cluster[:4], members, "batch")   # cluster 1: {2}
    assert torch.allclose(s_batch2, torch.tensor([1 / 2, 1 / 2, 1 / 2, 1.0]))
    assert torch.equal(cluster_grad_scale(entity, cluster, members, "none"), torch.ones(8))
    # the averaged gradient reaching a cluster row equals (sum of member grads) / |members|
    g = torch.randn(8, 3)
    row_grad = torch.zeros(3, 3).index_add_(0, cluster, g * s_members[:, None])
    expected0 = g[cluster == 0].sum(0) / 2
    assert torch.allclose(row_grad[0], expected0)
    with pytest.raises(ValueError):
        cluster_grad_scale(entity, cluster, members, "bogus")


def test_scatter_entity_grads_and_covariance():
    slot = torch.tensor([-1, 0, 1, -1])
    acc = torch.zeros(2, 2)
    scatter_entity_grads(acc, slot, torch.tensor([1, 2, 1, 0, 3]),
                         torch.tensor([[1., 0], [0, 1], [2, 2], [9, 9], [9, 9]]))
    assert acc.tolist() == [[3, 2], [0, 1]]
    x = torch.randn(50, 4, dtype=torch.float64)
    seg = torch.randint(0, 3, (50,))
    count, mean, scatter = segment_covariance(x, seg, 3, chunk_rows=7)
    for s in range(3):
        xs = x[seg == s]
        c = xs - xs.mean(0)
        assert int(count[s]) == len(xs)
        assert torch.allclose(scatter[s], c.T @ c)


def test_gpca_separates_planted_opposite_groups_exactly():
    torch.manual_seed(0)
    d = 8
    direction = torch.nn.functional.normalize(torch.randn(d), dim=0)
    n = 40
    side = torch.arange(n) % 2 == 0
    grads = torch.where(side[:, None], direction * 3.0, -direction * 3.0) + 0.1 * torch.randn(n, d)
    assignment = torch.zeros(n, dtype=torch.int32)
    plan = gpca_split(assignment, num_active=1, capacity=4, parents=torch.tensor([0]),
                      member_entities=torch.arange(n), member_grads=grads)
    assert plan.num_splits == 1 and plan.children.tolist() == [1]
    moved = set(plan.moved_entities.tolist())
    group_a = set(torch.nonzero(side).flatten().tolist())
    group_b = set(torch.nonzero(~side).flatten().tolist())
    assert moved in (group_a, group_b)
    apply_split(assignment, plan)
    assert torch.bincount(assignment.long()).tolist() == [20, 20]
    # median split of the same data divides into halves too
    plan_m = gpca_split(torch.zeros(n, dtype=torch.int32), 1, 4, torch.tensor([0]), torch.arange(n),
                        grads, method="median")
    assert set(plan_m.moved_entities.tolist()) in (group_a, group_b)


def test_gpca_several_clusters_at_once_and_skip_empty_side():
    torch.manual_seed(1)
    d = 4
    # cluster 0: two groups; cluster 1: identical gradients (no direction -> one side empty)
    assignment = torch.tensor([0] * 6 + [1] * 4 + [2] * 3, dtype=torch.int32)
    g0 = torch.cat([torch.ones(3, d), -torch.ones(3, d)]) + 0.01 * torch.randn(6, d)
    g1 = torch.ones(4, d)
    g2 = torch.tensor([[5.0, 0, 0, 0], [-5.0, 0, 0, 0], [0.1, 0, 0, 0]])
    grads = torch.cat([g0, g1, g2])
    plan = gpca_split(assignment.clone(), 3, 10, torch.tensor([0, 1, 2]), torch.arange(13), grads)
    assert plan.parents.tolist() == [0, 2] and plan.children.tolist() == [3, 4]
    assert plan.skipped.tolist() == [1]
    a = assignment.clone()
    apply_split(a, plan)
    assert set(a[:6].tolist()) == {0, 3} and set(a[6:10].tolist()) == {1}
    # capacity limits the number of splits
    plan_cap = gpca_split(assignment.clone(), 3, 4, torch.tensor([0, 2]), torch.arange(13), grads)
    assert plan_cap.parents.tolist() == [0]


def test_choose_clusters_criteria():
    members = torch.tensor([5, 1, 3, 3, 0])
    inter = torch.tensor([10, 100, 30, 30, 0])
    assert choose_clusters("interactions", 4, 2, member_counts=members,
                           interaction_counts=inter).tolist() == [2, 3]   # 1 has one member
    assert choose_clusters("members", 4, 1, member_counts=members).tolist() == [0]
    assert choose_clusters("grad_norm", 4, 1, member_counts=members,
                           grad_norms=torch.tensor([1., 9, 2, 3, 0])).tolist() == [3]
    assert choose_clusters("mean_loss", 4, 1, member_counts=members, interaction_counts=inter,
                           loss_sums=torch.tensor([50., 0, 60, 10, 0])).tolist() == [0]
    assert choose_clusters("loss", 4, 1, member_counts=members,
                           loss_sums=torch.tensor([50., 0, 60, 10, 0])).tolist() == [2]
    with pytest.raises(ValueError):
        choose_clusters("loss", 4, 1, member_counts=members)


def _brute_force_reassign(assignment, num_active, entities, losses):
    """Loop-based reference of decide_reassignment with keep_prob = 0."""
    new = assignment.long().clone()
    old = assignment.long()
    best = {}
    for row, e in enumerate(entities.tolist()):
        vals = losses[row, :num_active].tolist()
        best[e] = min(range(num_active), key=lambda k: (vals[k], k))
        new[e] = best[e]
    changed = True
    while changed:   # keeping a leaver may empty its target: repeat to a fixpoint
        changed = False
        for c in range(num_active):
            if int((old == c).sum()) > 0 and int((new == c).sum()) == 0:
                leavers = [(row, e) for row, e in enumerate(entities.tolist())
                           if int(old[e]) == c and best[e] != c]
                row, e = min(leavers, key=lambda re: (float(losses[re[0], c] - losses[re[0], best[re[1]]]), re[1]))
                new[e] = c
                changed = True
    return new


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(6, 30), st.integers(0, 10_000))
def test_reassignment_mf_closed_form_equals_brute_force(num_clusters, num_entities, seed):
    g = torch.Generator().manual_seed(seed)
    d = 3
    clusters = torch.randn(num_clusters, d, generator=g, dtype=torch.float64)
    assignment = torch.randint(0, num_clusters, (num_entities,), generator=g).to(torch.int32)
    assignment[:num_clusters] = torch.arange(num_clusters, dtype=torch.int32)   # none empty
    n_obs = 4 * num_entities
    ent = torch.randint(0, num_entities, (n_obs,), generator=g)
    x = torch.randn(n_obs, d, generator=g, dtype=torch.float64)          # the other side's vector
    y = torch.randn(n_obs, generator=g, dtype=torch.float64)
    const = torch.randn(n_obs, generator=g, dtype=torch.float64)
    # brute force: literally evaluate the loss of each entity's interactions under each cluster
    seen = torch.unique(ent)
    brute = torch.zeros(len(seen), num_clusters, dtype=torch.float64)
    for row, e in enumerate(seen.tolist()):
        m = ent == e
        for k in range(num_clusters):
            pred = x[m] @ clusters[k] + const[m]
            brute[row, k] = ((y[m] - pred) ** 2).sum()
    slot = torch.full((num_entities,), -1, dtype=torch.long)
    slot[seen] = torch.arange(len(seen))
    stats = mf_sufficient_stats(x, y - const, slot[ent], len(seen))
    closed = mf_loss_matrix(*stats, clusters)
    assert torch.allclose(closed, brute, rtol=1e-9, atol=1e-9)
    plan = decide_reassignment(assignment, num_clusters, seen, closed, keep_prob=0.0)
    expected = _brute_force_reassign(assignment, num_clusters, seen, brute)
    assert torch.equal(plan.new_assignment.long(), expected)
    assert int(plan.new_assignment.min()) >= 0 and int(plan.new_assignment.max()) < num_clusters
    assert int(torch.bincount(plan.new_assignment.long(), minlength=num_clusters).min()) > 0


def test_reassignment_mlp_candidate_losses_equal_brute_force():
    torch.manual_seed(3)
    d, num_clusters, num_entities, n_obs = 4, 5, 12, 60
    mlp = torch.nn.Sequential(torch.nn.Linear(2 * d, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).double()
    clusters = torch.randn(num_clusters, d, dtype=torch.float64)
    users = torch.randn(n_obs, d, dtype=torch.float64)
    ent = torch.randint(0, num_entities, (n_obs,))
    y = torch.randn(n_obs, dtype=torch.float64)
    assignment = torch.randint(0, num_clusters, (num_entities,)).to(torch.int32)
    assignment[:num_clusters] = torch.arange(num_clusters, dtype=torch.int32)
    with torch.no_grad():
        # batched: every sample against every candidate cluster in one forward pass
        u_rep = users.repeat_interleave(num_clusters, 0)
        c_rep = clusters.repeat(n_obs, 1)
        pred = mlp(torch.cat([u_rep, c_rep], 1)).view(n_obs, num_clusters)
        sample_losses = (y[:, None] - pred) ** 2
        slot = torch.arange(num_entities)
        matrix = torch.zeros(num_entities, num_clusters, dtype=torch.float64)
        for start in range(0, n_obs, 16):   # mini-batches accumulate into the same matrix
            accumulate_candidate_losses(matrix, slot, ent[start:start + 16], sample_losses[start:start + 16])
        brute = torch.zeros(num_entities, num_clusters, dtype=torch.float64)
        for e in range(num_entities):
            m = ent == e
            for k in range(num_clusters):
                p = mlp(torch.cat([users[m], clusters[k].expand(int(m.sum()), d)], 1)).flatten()
                brute[e, k] = ((y[m] - p) ** 2).sum()
    assert torch.allclose(matrix, brute)
    seen = torch.unique(ent)
    plan = decide_reassignment(assignment, num_clusters, seen, matrix[seen], keep_prob=0.0)
    assert torch.equal(plan.new_assignment.long(),
                       _brute_force_reassign(assignment, num_clusters, seen, brute[seen]))


def test_reassignment_damping_and_refill():
    g = torch.Generator().manual_seed(0)
    n = 2000
    assignment = torch.zeros(n, dtype=torch.int32)
    assignment[: n // 2] = 1
    # everyone prefers cluster 2 (currently empty)
    losses = torch.tensor([[3.0, 2.0, 1.0]]).expand(n, 3)
    plan = decide_reassignment(assignment, 3, torch.arange(n), losses, keep_prob=0.31, generator=g)
    frac_kept = plan.num_kept_by_damping / n
    assert abs(frac_kept - 0.31) < 0.05
    counts = torch.bincount(plan.new_assignment.long(), minlength=3)
    assert int(counts.min()) > 0 and int(counts.sum()) == n
    # a cluster nobody picks and that had no members is refilled from the largest one
    losses2 = torch.tensor([[1.0, 2.0, 3.0]]).expand(n, 3)
    plan2 = decide_reassignment(assignment, 3, torch.arange(n), losses2, keep_prob=0.0, generator=g)
    c2 = torch.bincount(plan2.new_assignment.long(), minlength=3)
    assert int(c2.min()) > 0 and int(c2.sum()) == n
    assert plan2.row_dst.tolist() == [2] and plan2.row_src.tolist() == [0]
    assert plan2.num_kept_to_avoid_empty == 1   # cluster 1 keeps its cheapest leaver


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(8, 60), st.integers(1, 4), st.integers(0, 10_000),
       st.sampled_from(["sign", "median"]))
def test_invariants_under_splits_and_reassignments(init, n, splits, seed, method):
    g = torch.Generator().manual_seed(seed)
    capacity = 12
    init = min(init, n)
    state = ClusterState(n, capacity, init_clusters=init, generator=g)
    for _ in range(4):
        members = state.member_counts()
        parents = choose_clusters("members", state.num_active, splits, member_counts=members)
        touched = torch.randperm(n, generator=g)[: n // 2]
        grads = torch.randn(touched.numel(), 3, generator=g)
        plan = gpca_split(state.assignment, state.num_active, capacity, parents, touched, grads,
                          method=method)
        before = state.member_counts()
        apply_split(state.assignment, plan)
        after = state.member_counts()
        # members are conserved: each parent's old members = parent + child now
        for p, c in zip(plan.parents.tolist(), plan.children.tolist()):
            assert int(after[p] + after[c]) == int(before[p])
        assert int(after.sum()) == n
        state.num_active = state.num_active + plan.num_splits
        state.check_invariants()
        m = state.num_active
        seen = torch.unique(torch.randint(0, n, (n,), generator=g))
        losses = torch.rand(seen.numel(), m, generator=g)
        rplan = decide_reassignment(state.assignment, m, seen, losses, keep_prob=0.31, generator=g)
        state.assignment.copy_(rplan.new_assignment)
        state.check_invariants()


def test_narrow_maps_hold_every_cluster_id_and_count_their_own_bytes():
    from cel_torchrec.algorithm import map_dtype_for
    assert map_dtype_for(50) == torch.int32                          # the default keeps int32
    assert map_dtype_for(128, "auto") == torch.int8
    assert map_dtype_for(129, "auto") == torch.int16
    assert map_dtype_for(32768, "auto") == torch.int16
    assert map_dtype_for(32769, "auto") == torch.int32
    with pytest.raises(ValueError, match="map_dtype"):
        map_dtype_for(10, "uint8")
    with pytest.raises(ValueError, match="cannot hold 200 clusters"):
        ClusterState(num_entities=10, max_clusters=200, map_dtype=torch.int8)
    state = ClusterState(num_entities=300, max_clusters=128, init_clusters=128,
                         generator=torch.Generator().manual_seed(0), map_dtype=torch.int8)
    assert state.assignment.dtype == torch.int8 and int(state.assignment.max()) == 127
    state.move_entities(torch.tensor([0, 1]), torch.tensor([127, 126]))
    assert state.assignment[:2].tolist() == [127, 126]
    assert int(state.member_counts().sum()) == 300
    state.check_invariants()


def test_a_collection_with_narrow_maps_looks_up_and_counts_as_with_int32():
    from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
    from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=1000,
                                 feature_names=["f"])]
    out, sizes = [], []
    for dtype in ("int32", "auto"):
        torch.manual_seed(0)
        emb = ClusteredEmbeddingBagCollection(
            tables, {"t": ClusteringConfig(max_clusters=100, init_clusters=100, map_dtype=dtype)})
        kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([3, 999, 7, 0]),
                                                  torch.ones(4, dtype=torch.int64))
        out.append(emb(kjt).to_dict()["f"])
        sizes.append(emb.embedding_bytes())
        assert emb.cluster_states["t"].assignment.dtype == (torch.int32 if dtype == "int32"
                                                            else torch.int8)
    assert torch.equal(out[0], out[1])
    assert sizes[0] - sizes[1] == 1000 * 3                           # 4 -> 1 byte per entity
