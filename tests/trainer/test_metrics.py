"""trainer.metrics against straightforward reference computations on small arrays."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.metrics import (MetricAccumulator, auc_score, average_ranks,
                             classification_metrics, cluster_size_histogram, gini,
                             regression_metrics, sliced_metrics)


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
    # extreme logits stay finite
    assert math.isfinite(classification_metrics([1000.0, -1000.0], [0.0, 1.0])["logloss"])


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
