"""trainer.metrics against straightforward reference computations on small arrays."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.metrics import (MetricAccumulator, adjusted_rand_index, auc_score, average_ranks,
                             classification_metrics, cluster_purity, cluster_size_histogram,
                             contingency_counts, gini, planted_recovery, regression_metrics,
                             sliced_metrics)


def brute_force_auc(score, label):
    pos = [s for s, y in zip(score, label) if y >= 0.5]
    neg = [s for s, y in zip(score, label) if y < 0.5]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_regression_metrics_reference():
    rng = np.random.default_rng(0)
    pred, label = rng.normal(size=50), rng.normal(size=50)
    m = regression_metrics(torch.tensor(pred, dtype=torch.float64), label)
    assert m["mse"] == pytest.approx(np.mean((pred - label) ** 2))
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((pred - label) ** 2)))
    assert m["mae"] == pytest.approx(np.mean(np.abs(pred - label)))


def test_empty_inputs_give_nan():
    assert all(math.isnan(v) for v in regression_metrics([], []).values())
    assert all(math.isnan(v) for v in classification_metrics([], []).values())
    assert math.isnan(auc_score([0.1, 0.2], [1, 1]))            # one class only


def test_average_ranks_with_ties():
    np.testing.assert_allclose(average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])),
                               [4.0, 1.0, 4.0, 2.0, 4.0])


def test_auc_with_many_ties_matches_pairwise_count():
    rng = np.random.default_rng(1)
    score = rng.integers(0, 4, size=60).astype(float)            # heavy ties
    label = rng.integers(0, 2, size=60)
    assert auc_score(score, label) == pytest.approx(brute_force_auc(score, label))
    assert auc_score([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auc_score([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0
    assert auc_score([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=2, max_size=30))
def test_auc_property(pairs):
    score = [float(s) for s, _ in pairs]
    label = [int(y) for _, y in pairs]
    if len(set(label)) < 2:
        assert math.isnan(auc_score(score, label))
    else:
        assert auc_score(score, label) == pytest.approx(brute_force_auc(score, label))


def test_classification_metrics_reference():
    rng = np.random.default_rng(2)
    logit = rng.normal(size=40)
    label = rng.integers(0, 2, size=40).astype(float)
    m = classification_metrics(torch.tensor(logit), torch.tensor(label))
    prob = 1 / (1 + np.exp(-logit))
    ref_logloss = -np.mean(label * np.log(prob) + (1 - label) * np.log(1 - prob))
    assert m["logloss"] == pytest.approx(ref_logloss)
    assert m["accuracy"] == pytest.approx(np.mean((prob > 0.5) == (label == 1)))
    assert m["auc"] == pytest.approx(brute_force_auc(logit, label))
    # normalized entropy: log-loss over the base rate's log-loss
    base = label.mean()
    ref_ne = ref_logloss / -(base * np.log(base) + (1 - base) * np.log(1 - base))
    assert m["ne"] == pytest.approx(ref_ne)
    # extreme logits stay finite
    assert math.isfinite(classification_metrics([1000.0, -1000.0], [0.0, 1.0])["logloss"])


def test_auc_agrees_with_torchrec_metrics():
    from torchrec.metrics.auc import compute_auc
    rng = np.random.default_rng(5)
    score = rng.normal(size=300)
    label = (rng.random(300) < 1 / (1 + np.exp(-2 * score))).astype(float)
    ref = compute_auc(1, [torch.tensor(score)[None].float()], [torch.tensor(label)[None].float()],
                      [torch.ones(1, 300)])
    assert auc_score(score, label) == pytest.approx(float(ref[0]), abs=1e-6)


def _slice_fixture():
    # users 0..3, items 0..4; threshold 2: cold users {0, 3}, cold items {1, 4} and id 9 (unseen)
    user_counts = np.array([1, 5, 2, 0])
    item_counts = np.array([3, 1, 8, 2, 0])
    users = np.array([0, 1, 2, 3, 1, 2, 0, 1])
    items = np.array([0, 1, 2, 3, 4, 0, 9, 2])
    pred = np.array([3.0, 4.0, 2.5, 1.0, 5.0, 3.5, 2.0, 4.5])
    label = np.array([3.5, 4.0, 2.0, 2.0, 3.0, 3.0, 1.0, 5.0])
    return pred, label, users, items, user_counts, item_counts


def test_sliced_metrics_rating_reference():
    pred, label, users, items, uc, ic = _slice_fixture()
    m = sliced_metrics(torch.tensor(pred), torch.tensor(label), torch.tensor(users),
                       torch.tensor(items), torch.tensor(uc), ic, 2, "rating")
    cold_u = np.isin(users, [0, 3])
    cold_i = np.isin(items, [1, 4, 9])

    def rmse(mask):
        return np.sqrt(np.mean((pred[mask] - label[mask]) ** 2))

    assert m["rmse"] == pytest.approx(rmse(np.ones(8, bool)))
    assert m["rmse_cold_users"] == pytest.approx(rmse(cold_u))
    assert m["rmse_warm_users"] == pytest.approx(rmse(~cold_u))
    assert m["rmse_cold_items"] == pytest.approx(rmse(cold_i))
    assert m["rmse_warm_items"] == pytest.approx(rmse(~cold_i))
    assert m["mae_cold_items"] == pytest.approx(np.mean(np.abs(pred - label)[cold_i]))
    assert m["count"] == 8
    assert (m["count_cold_users"], m["count_warm_users"]) == (3, 5)
    assert (m["count_cold_items"], m["count_warm_items"]) == (3, 5)
    assert m["rmse_cold"] == m["rmse_cold_items"] and m["rmse_warm"] == m["rmse_warm_items"]
    assert m["count_cold"] == 3
    assert all(k == k.lower() and " " not in k for k in m)


def test_sliced_metrics_empty_slice_is_nan():
    pred, label, users, items, uc, ic = _slice_fixture()
    m = sliced_metrics(pred, label, users, items, uc, ic, 0, "rating")   # nothing is cold
    assert math.isnan(m["rmse_cold_items"]) and math.isnan(m["rmse_cold_users"])
    assert m["count_cold_items"] == 0 and m["rmse_warm_items"] == pytest.approx(m["rmse"])


def test_sliced_metrics_click():
    pred, label, users, items, uc, ic = _slice_fixture()
    clicks = (label >= 3).astype(float)
    m = sliced_metrics(pred - 3, clicks, users, items, uc, ic, 2, "click")
    cold_i = np.isin(items, [1, 4, 9])
    assert m["auc"] == pytest.approx(brute_force_auc(pred, clicks))
    assert m["auc_warm_items"] == pytest.approx(brute_force_auc(pred[~cold_i], clicks[~cold_i]))
    assert {"logloss_cold_users", "accuracy_warm_users", "auc_cold"} <= set(m)
    with pytest.raises(ValueError):
        sliced_metrics(pred, label, users, items, uc, ic, 2, "ranking")


@pytest.mark.parametrize("kind", ["rating", "click"])
def test_accumulator_equals_one_shot(kind):
    pred, label, users, items, uc, ic = _slice_fixture()
    if kind == "click":
        pred, label = pred - 3, (label >= 3).astype(float)
    expected = sliced_metrics(pred, label, users, items, uc, ic, 2, kind)
    acc = MetricAccumulator(kind, user_train_counts=torch.tensor(uc), item_train_counts=ic,
                            cold_threshold=2)
    for sl in (slice(0, 3), slice(3, 4), slice(4, 8)):
        acc.update(torch.tensor(pred[sl]), torch.tensor(label[sl]), torch.tensor(users[sl]),
                   torch.tensor(items[sl]))
    assert len(acc) == 8
    got = acc.compute()
    assert set(got) == set(expected)
    for k in expected:
        assert got[k] == pytest.approx(expected[k], nan_ok=True, rel=1e-6), k


def test_accumulator_states_merge_like_one_rank():
    pred, label, users, items, uc, ic = _slice_fixture()
    full = MetricAccumulator("rating", uc, ic, cold_threshold=2)
    full.update(pred, label, users, items)
    ranks = [MetricAccumulator("rating", uc, ic, cold_threshold=2) for _ in range(2)]
    ranks[0].update(pred[:5], label[:5], users[:5], items[:5])
    ranks[1].update(pred[5:], label[5:], users[5:], items[5:])
    merged = MetricAccumulator.from_states([r.state() for r in ranks]).compute()
    for k, v in full.compute().items():
        assert merged[k] == pytest.approx(v, nan_ok=True, rel=1e-6), k


def test_accumulator_without_counts_has_no_slices():
    acc = MetricAccumulator("rating")
    acc.update(torch.ones(4), torch.zeros(4))
    assert acc.compute() == {"mse": 1.0, "rmse": 1.0, "mae": 1.0, "count": 4}
    empty = MetricAccumulator("click", [1, 2], [3], cold_threshold=2).compute()
    assert empty["count"] == 0 and math.isnan(empty["auc"]) and empty["count_cold_items"] == 0


def test_cluster_size_histogram():
    assignment = torch.tensor([0, 0, 0, 1, 2, 2, 0, 4], dtype=torch.int32)
    h = cluster_size_histogram(assignment, 5)
    assert h["sizes"] == [4, 2, 1, 1, 0]
    assert (h["min"], h["max"], h["median"], h["num_empty"]) == (0, 4, 1.0, 1)
    assert h["num_clusters"] == 5 and h["num_entities"] == 8
    sizes = np.array([4, 1, 2, 0, 1], float)
    ref_gini = np.abs(sizes[:, None] - sizes[None, :]).sum() / (2 * len(sizes) ** 2 * sizes.mean())
    assert h["gini"] == pytest.approx(ref_gini)
    assert gini([3, 3, 3]) == 0.0 and gini([0, 0, 9]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        cluster_size_histogram(torch.tensor([0, 5]), 3)
    one = cluster_size_histogram(torch.zeros(6, dtype=torch.long), 1)
    assert one["sizes"] == [6] and one["gini"] == 0.0


# ----------------------------------------------------------------------------- planted clusters
def brute_force_ari(a, b):
    """Pair counting: over all pairs, agreement of 'same cluster' in a and in b."""
    from itertools import combinations
    from math import comb
    n = len(a)
    same_a = same_b = both = 0
    for i, j in combinations(range(n), 2):
        sa, sb = a[i] == a[j], b[i] == b[j]
        same_a, same_b, both = same_a + sa, same_b + sb, both + (sa and sb)
    expected = same_a * same_b / comb(n, 2)
    top = (same_a + same_b) / 2
    return 1.0 if top == expected else (both - expected) / (top - expected)


def brute_force_purity(learned, planted):
    total = 0
    for c in set(learned):
        members = [p for l, p in zip(learned, planted) if l == c]
        total += max(members.count(p) for p in set(members))
    return total / len(learned)


def test_ari_and_purity_match_brute_force_on_random_labelings():
    rng = np.random.default_rng(3)
    for trial in range(40):
        n = int(rng.integers(2, 40))
        a = rng.integers(0, int(rng.integers(1, 6)), size=n)
        b = rng.integers(0, int(rng.integers(1, 6)), size=n)
        if trial % 4 == 0:
            b = np.where(rng.random(n) < 0.7, a, b)          # correlated labelings too
        assert adjusted_rand_index(a, b) == pytest.approx(brute_force_ari(list(a), list(b)))
        assert cluster_purity(a, b) == pytest.approx(brute_force_purity(list(a), list(b)))


def test_ari_identical_and_relabelled_partitions_is_one():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 7, size=500)
    relabel = rng.permutation(7) * 1000 + 5                 # sparse, large label values
    assert adjusted_rand_index(a, a) == 1.0
    assert adjusted_rand_index(relabel[a], a) == pytest.approx(1.0)
    assert adjusted_rand_index(torch.tensor(a, dtype=torch.int32), a) == pytest.approx(1.0)
    assert adjusted_rand_index(np.zeros(5), np.zeros(5)) == 1.0    # both trivial
    assert abs(adjusted_rand_index(rng.integers(0, 5, 20000), rng.integers(0, 5, 20000))) < 0.01
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) < 0          # below chance
    assert math.isnan(adjusted_rand_index([], []))


def test_purity_one_for_a_refinement_below_one_for_a_mix():
    planted = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    refined = np.array([5, 5, 6, 6, 7, 7, 8, 9])            # splits planted clusters only
    assert cluster_purity(refined, planted) == 1.0
    assert adjusted_rand_index(refined, planted) < 1.0
    mixed = np.array([0, 0, 0, 1, 1, 1, 1, 1])              # cluster 1 mixes both planted ones
    assert cluster_purity(mixed, planted) == pytest.approx(7 / 8)
    assert cluster_purity(np.zeros(8, int), planted) == pytest.approx(0.5)
    assert math.isnan(cluster_purity([], []))
    with pytest.raises(ValueError, match="differ in size"):
        cluster_purity([0, 1], [0])


def test_contingency_is_sparse_for_many_clusters():
    rng = np.random.default_rng(5)
    n = 200_000
    planted = rng.integers(0, 10_000, size=n)
    learned = planted * 3 + rng.integers(0, 3, size=n)       # 3e4 x 1e4 dense cells: sparse path
    rows, cols, counts = contingency_counts(learned, planted)
    assert counts.sum() == n and counts.size <= n and (counts > 0).all()
    assert cluster_purity(learned, planted) == 1.0
    assert 0.0 < adjusted_rand_index(learned, planted) < 1.0


def test_planted_recovery_uses_warm_entities_only():
    planted = np.array([0, 0, 1, 1, 2, 2])
    learned = np.array([0, 0, 1, 1, 1, 0])                  # the last two are wrong, but cold
    counts = np.array([5, 9, 5, 6, 4, 0])
    out = planted_recovery({"items": learned}, {"items": planted}, {"items": counts})
    assert out == {"purity_items": 1.0, "ari_items": 1.0}
    everyone = planted_recovery({"items": learned}, {"items": planted}, {"items": counts},
                                min_interactions=0)
    assert everyone["purity_items"] < 1.0 and everyone["ari_items"] < 1.0
    assert planted_recovery({"users": learned}, {"items": planted}, {"users": counts}) == {}
