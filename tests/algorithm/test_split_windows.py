"""Informed splits: split windows record only members the data shows, splits move only those,
the principal direction by power iteration matches eigh, counters stay exact, and a split
event's memory does not grow with the table."""
import torch

from cel_torchrec.algorithm import (ClusterState, SplitWindow, apply_split, coverage_window_steps,
                                    gpca_split, principal_directions, top_eigenvectors)


def test_power_iteration_matches_eigh():
    g = torch.Generator().manual_seed(0)
    s, d = 64, 32
    q, _ = torch.linalg.qr(torch.randn(s, d, d, generator=g, dtype=torch.float64))
    # spectra with a top eigengap of 10-50 %
    lam = torch.rand(s, d, generator=g, dtype=torch.float64).sort(dim=1, descending=True).values
    lam[:, 0] = lam[:, 1] * (1.1 + 0.4 * torch.rand(s, generator=g, dtype=torch.float64))
    mats = q @ torch.diag_embed(lam) @ q.transpose(1, 2)
    want = torch.linalg.eigh(mats)[1][:, :, -1]
    got = top_eigenvectors(mats.float())
    cos = (got.double() * want).sum(1).abs()
    assert cos.min() > 0.999, cos.min()


def test_principal_directions_power_agrees_with_eigh_on_gradients():
    g = torch.Generator().manual_seed(1)
    n, d, s = 3000, 16, 5
    seg = torch.randint(0, s, (n,), generator=g)
    dirs = torch.nn.functional.normalize(torch.randn(s, d, generator=g), dim=1)
    x = torch.randn(n, d, generator=g) * 0.3 + 3 * torch.randn(n, 1, generator=g) * dirs[seg]
    m1, v1 = principal_directions(x, seg, s, solver="power")
    m2, v2 = principal_directions(x, seg, s, solver="eigh")
    assert torch.allclose(m1.double(), m2, atol=1e-5)
    assert ((v1.double() * v2).sum(1) > 0.9999).all()     # same sign convention too


def test_split_never_moves_a_member_without_data():
    g = torch.Generator().manual_seed(2)
    n, d = 1000, 8
    assignment = torch.zeros(n, dtype=torch.int32)
    informed = torch.randperm(n, generator=g)[:60]
    side = torch.arange(60) % 2 == 0
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    grads = torch.where(side[:, None], direction, -direction) * 2 + 0.05 * torch.randn(60, d, generator=g)
    plan = gpca_split(assignment, 1, 4, torch.tensor([0]), informed, grads)
    assert plan.num_splits == 1
    moved = set(plan.moved_entities.tolist())
    assert moved and moved <= set(informed.tolist())
    assert moved in ({int(e) for e, s_ in zip(informed, side) if s_},
                     {int(e) for e, s_ in zip(informed, side) if not s_})
    # rows of entities that left the parent are ignored
    assignment[informed[:10]] = 1
    plan2 = gpca_split(assignment, 2, 4, torch.tensor([0]), informed, grads)
    assert not set(plan2.moved_entities.tolist()) & set(informed[:10].tolist())


def test_window_records_only_candidate_members_within_its_row_bound():
    n, d = 50, 4
    state = ClusterState(n, 8, init_clusters=1)
    state.assignment[25:] = 1
    state.num_active = 2
    w = SplitWindow(n, 8, d, max_rows=5)
    w.open(torch.tensor([1]))
    ids = torch.tensor([30, 31, 30, 2, 40, 41, 42, 43, 44])   # 2 is in cluster 0: not recorded
    grads = torch.arange(9 * d, dtype=torch.float32).view(9, d)
    w.record(ids, state.assignment[ids].long(), grads)
    ents, g, c = w.rows()
    assert w.num_rows == 5 and ents.tolist() == [30, 31, 40, 41, 42]
    assert w.dropped == 2                                       # 43, 44: window full
    assert torch.equal(g[0], grads[0] + grads[2]) and c.tolist() == [2, 1, 1, 1, 1]
    # reopening resets exactly the slots it used
    w.open(torch.tensor([0]))
    assert w.num_rows == 0 and bool((w.slot_of_entity == -1).all())
    # a merge over "ranks" sums the rows of the same entity
    w.record(torch.tensor([3, 4]), torch.tensor([0, 0]), torch.ones(2, d))
    ents, g, c = w.rows(gather=lambda t: torch.cat([t, t]))
    assert ents.tolist() == [3, 4] and torch.equal(g, 2 * torch.ones(2, d)) and c.tolist() == [2, 2]


def test_split_keeps_cluster_counters_exact():
    g = torch.Generator().manual_seed(3)
    n = 500
    state = ClusterState(n, 16, init_clusters=4, generator=g)
    state.count_interactions(torch.randint(0, n, (3000,), generator=g))
    state.member_counts(), state.interaction_counts()          # caches warm
    informed = torch.randperm(n, generator=g)[:200]
    plan = gpca_split(state.assignment, 4, 16, torch.tensor([0, 1, 2, 3]), informed,
                      torch.randn(200, 6, generator=g))
    apply_split(state, plan)
    assert state.num_active == 4 + plan.num_splits
    state.count_interactions(torch.randint(0, n, (700,), generator=g))
    members = torch.bincount(state.assignment.long(), minlength=16)
    inter = torch.zeros(16, dtype=torch.int64).index_add_(0, state.assignment.long(),
                                                          state.entity_interactions.long())
    assert torch.equal(state.member_counts(), members)
    assert torch.equal(state.interaction_counts(), inter)
    state.check_invariants()


def test_coverage_window_is_the_same_fraction_of_an_epoch_at_any_size():
    fractions = []
    for n in (1_000, 100_000, 10_000_000):
        state = ClusterState(n, 64, init_clusters=1)
        batch = 1024
        steps = coverage_window_steps(state, torch.tensor([0]), 1.0, batch)
        epoch_steps = (10 * n) / batch              # ~10 interactions per entity per epoch
        fractions.append(steps / epoch_steps)
    assert max(fractions) / min(fractions) < 1.03 and abs(fractions[0] - 0.1) < 0.01   # ceil


def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation made while `fn` runs (torch profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_split_event_memory_does_not_grow_with_the_table():
    """A split of 8 candidates with 2,000 recorded members allocates no entity-sized buffer:
    the largest allocation (the rows' d x d outer products) is the same at 1e4 and 1e6
    entities."""
    peaks = {}
    for n in (10_000, 1_000_000):
        g = torch.Generator().manual_seed(4)
        state = ClusterState(n, 64, init_clusters=8, generator=g)
        w = SplitWindow(n, 64, 16, max_rows=4096)
        w.open(torch.arange(8))
        ids = torch.randint(0, n, (2000,), generator=g)
        w.record(ids, state.assignment[ids].long(), torch.randn(2000, 16, generator=g))
        state.member_counts(), state.interaction_counts()

        def event():
            ents, grads, _ = w.rows()
            plan = gpca_split(state.assignment, state.num_active, state.capacity, w.candidates,
                              ents, grads)
            apply_split(state, plan)
            w.open(torch.arange(4))
        peaks[n] = _largest_allocation(event)
    assert peaks[1_000_000] < 4 * 1_000_000, peaks      # below one int32 per entity
    assert peaks[1_000_000] <= 1.5 * peaks[10_000] + 4096, peaks
