"""ELSA (trainer.elsa): scores and loss against their formulas by brute force, the collection
path against the dense formula, the CEL reassignment scorer against the ELSA loss with one
column moved, trained runs (full and CEL, with splits and reassignments) beating an untrained
model on recall@20, and clear errors for bad inputs."""
import json
import math
import pathlib

import numpy as np
import pytest
import torch

from data_pipeline.dataset import load_train_counts
from data_pipeline.synthetic import ensure_synthetic
from trainer import elsa
from trainer.builders import build_embedding_collection
from trainer.models import ITEM
from trainer.retrieval import RankingEvaluator


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("elsa_data")
    return pathlib.Path(ensure_synthetic(root / "cache", users=200, items=120, interactions=6000,
                                         clusters=4, seed=0, label="rating"))


def _cfg(data, out, **kw) -> elsa.ElsaConfig:
    base = dict(data=str(data), out=str(out), dim=16, epochs=4, lr=0.03, batch_users=32)
    return elsa.ElsaConfig(**{**base, **kw})


def test_scores_and_loss_equal_their_formulas_by_brute_force():
    rng = np.random.default_rng(0)
    users, items, d = 4, 7, 3
    a = rng.normal(size=(items, d))
    x = (rng.random((users, items)) < 0.4).astype(float)
    x[:, 0] = 1.0                                           # every user has a positive
    a_hat = a / np.linalg.norm(a, axis=1, keepdims=True)
    want_s = np.zeros((users, items))
    want_l = np.zeros(users)
    for u in range(users):
        for j in range(items):
            want_s[u, j] = sum(a_hat[i] @ a_hat[j] for i in range(items) if x[u, i]) - x[u, j]
        p = want_s[u] / math.sqrt(sum(v * v for v in want_s[u]))
        t = x[u] / math.sqrt(x[u].sum())
        want_l[u] = sum((p[j] - t[j]) ** 2 for j in range(items))
    got_hat = elsa.normalise_rows(torch.tensor(a))
    s = elsa.elsa_scores(torch.tensor(x), got_hat)
    assert np.allclose(s.numpy(), want_s, atol=1e-12)
    assert np.allclose(elsa.elsa_loss(s, torch.tensor(x)).numpy(), want_l, atol=1e-12)
    # the normalised MSE is 2 - 2 cos(scores, x)
    cos = (want_s * x).sum(1) / np.linalg.norm(want_s, axis=1) / np.linalg.norm(x, axis=1)
    assert np.allclose(want_l, 2 - 2 * cos, atol=1e-12)


@pytest.mark.parametrize("method", ["full", "cel", "qr"])
def test_collection_path_equals_the_dense_formula(method):
    cfg = elsa.ElsaConfig(data="", out="", method=method, dim=8, clusters=5, splits_per_event=1)
    items = 30
    emb = build_embedding_collection(elsa.train_config(cfg), 1, items, torch.device("cpu"))
    if method == "cel":        # five distinct rows for the 30 items
        st = emb.cluster_states["item"]
        st.assignment.copy_(torch.arange(items, dtype=torch.int32) % 5)
        st.num_active = 5
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    cols = torch.tensor([3, 7, 3, 0, 1, 29])
    emb.train()
    scores, x, cat = elsa.batch_forward(emb, rows, cols, 3, items, "cpu")
    assert x.sum() == 6 and x[0, 3] == 1 and x[2, 29] == 1
    assert torch.allclose(cat.norm(dim=1), torch.ones(items), atol=1e-6)
    with torch.no_grad():
        want = elsa.elsa_scores(x, elsa.normalise_rows(elsa._lookup_items(emb, items, "cpu")))
    assert torch.allclose(scores.detach(), want, atol=1e-5)
    if method == "cel":        # the catalogue part of the lookup is no interaction
        assert torch.equal(emb.cluster_states["item"].entity_interactions,
                           torch.bincount(cols, minlength=items).int())


def test_phase_scorer_is_the_elsa_loss_with_one_column_moved():
    """Each pseudo-sample's library "mse" (model output vs label 0) equals its weight times user
    u's ELSA loss when only s_uj changes: at the current rows, and for another row of j."""
    torch.manual_seed(0)
    users, items, d = 5, 9, 4
    cfg = elsa.ElsaConfig(data="", out="", method="full", dim=d)
    emb = build_embedding_collection(elsa.train_config(cfg), 1, items, torch.device("cpu"))
    rng = np.random.default_rng(0)
    x = (rng.random((users, items)) < 0.4)
    x[:, 1] = True
    uu, ii = np.nonzero(x)
    from trainer.retrieval import _csr
    indptr, indices = _csr(uu, ii, users, items)
    batches = elsa.phase_batches(emb, indptr, indices, items, 3, np.random.default_rng(1), "cpu",
                                 sample_batch=7)
    with torch.no_grad():
        a_hat = elsa.normalise_rows(elsa._lookup_items(emb, items, "cpu"))
    X = torch.tensor(x, dtype=torch.float32)
    S = elsa.elsa_scores(X, a_hat)
    L = elsa.elsa_loss(S, X)
    other = torch.randn(d)
    model = elsa.ElsaPhaseModel()
    n_pos, n_neg = 0, 0
    for kjt, dense, label in batches:
        j = kjt[ITEM].values()
        with torch.no_grad():
            pooled = emb(kjt).to_dict()
            got = model(pooled, dense) ** 2                       # per_sample_loss mse, label 0
            moved = model({**pooled, ITEM: other.expand(j.numel(), d)}, dense) ** 2
        w = dense[:, d + 4]
        for r in range(j.numel()):
            # which user: the one whose vector (without j if positive) matches the sample's
            xj = float(dense[r, d + 3])
            z = dense[r, :d] + xj * a_hat[j[r]]
            u = int(torch.argmin(((X @ a_hat) - z).norm(dim=1)))
            assert bool(X[u, j[r]]) == (xj == 1.0)
            assert float(got[r]) == pytest.approx(float(w[r] * L[u]), rel=1e-4, abs=1e-6)
            s = S[u].clone()
            s[j[r]] = (dense[r, :d] * elsa.normalise_rows(other[None])[0]).sum()
            want = elsa.elsa_loss(s[None], X[u][None])[0]
            assert float(moved[r]) == pytest.approx(float(w[r] * want), rel=1e-4, abs=1e-6)
            n_pos, n_neg = n_pos + (xj == 1.0), n_neg + (xj == 0.0)
            if xj == 0.0:      # Horvitz-Thompson weight of a uniform draw
                assert float(w[r]) == pytest.approx(items / (3 * X[u].sum().item()))
    assert n_pos == x.sum() and n_neg > 0


def test_batched_candidate_scores_equal_one_forward_per_candidate():
    """ElsaPhaseModel.candidate_predictions (the library's batched hook) gives, for shared and
    per-sample candidates and with per-entity offsets, what the repeated-batch forward gives."""
    from cel_torchrec.phases import candidate_losses
    torch.manual_seed(0)
    b, k, d = 6, 4, 5
    model = elsa.ElsaPhaseModel()
    dense = torch.cat([torch.randn(b, d), torch.rand(b, 1), torch.rand(b, 1) + 1,
                       torch.rand(b, 1) + 0.1, (torch.rand(b, 1) < 0.5).float(),
                       torch.rand(b, 1) + 0.5], 1)
    label = torch.zeros(b)
    shared, per = torch.randn(k, d), torch.randn(b, k, d)
    offsets = torch.randn(b, d)

    class Plain(torch.nn.Module):           # the same model without the hook
        def forward(self, pooled, dense):
            return model(pooled, dense)

    pooled = {ITEM: torch.randn(b, d)}
    for cands in (shared, per):
        for off in (None, offsets):
            got = candidate_losses(model, pooled, dense, label, ITEM, "mse", cands, off)
            want = candidate_losses(Plain(), pooled, dense, label, ITEM, "mse", cands, off)
            assert got.shape == (b, k)
            assert torch.allclose(got, want, atol=1e-6)
    rows = shared[None].expand(b, k, d)
    one = torch.stack([model({ITEM: rows[:, c]}, dense) for c in range(k)], 1)
    assert torch.allclose(model.candidate_predictions(pooled, dense, ITEM, shared), one, atol=1e-6)


def _untrained_recall(data, cfg) -> float:
    from data_pipeline.dataset import load_meta
    meta = load_meta(data)
    emb = build_embedding_collection(elsa.train_config(cfg), 1, meta.num_items, torch.device("cpu"))
    indptr, indices = elsa.load_positives(data, "train", meta.num_users, meta.num_items)
    ev = RankingEvaluator(data, "val", meta.num_users, meta.num_items,
                          load_train_counts(data, "users"), load_train_counts(data, "items"), 5)
    return elsa.ranking_metrics(emb, ev, indptr, indices, meta.num_users, meta.num_items,
                                "cpu")["recall_at_20"]


def test_trained_full_elsa_beats_untrained(data, tmp_path):
    cfg = _cfg(data, tmp_path / "full")
    metrics = elsa.train(cfg)
    base = _untrained_recall(data, cfg)
    assert metrics["best_val_recall_at_20"] > base + 0.05, (metrics["best_val_recall_at_20"], base)
    written = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert written["item_side_bytes"] == 120 * 16 * 4 and written["model"] == "elsa"
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["epoch"] == 4


def test_cel_item_elsa_trains_within_its_budget_and_beats_untrained(data, tmp_path):
    cfg = _cfg(data, tmp_path / "cel", method="cel", clusters=12, epochs=5, reassign_every=4)
    metrics, emb = elsa.fit(cfg)
    state = emb.cluster_states["item"]
    assert 1 < metrics["num_clusters_items"] <= 12 and state.num_active <= 12
    state.check_invariants()
    assert metrics["reassign_time_s"] > 0 and metrics["split_time_s"] > 0
    # every training positive counted once per epoch, the catalogue lookups not at all
    from data_pipeline.dataset import load_meta
    meta = load_meta(data)
    indptr, indices = elsa.load_positives(data, "train", meta.num_users, meta.num_items)
    want = 5 * np.bincount(indices, minlength=meta.num_items)
    assert np.array_equal(state.entity_interactions.numpy(), want)
    base = _untrained_recall(data, cfg)        # one cluster: every item ties
    assert metrics["best_val_recall_at_20"] > base + 0.05, (metrics["best_val_recall_at_20"], base)


def test_bad_inputs_give_clear_errors(data, tmp_path, capsys):
    with pytest.raises(elsa.ElsaError, match="no meta.json"):
        elsa.train(_cfg(tmp_path / "nowhere", tmp_path / "o"))
    with pytest.raises(elsa.ElsaError, match="dim must be >= 1"):
        elsa.train(_cfg(data, tmp_path / "o", dim=0))
    with pytest.raises(elsa.ElsaError, match="compression"):
        elsa.train(_cfg(data, tmp_path / "o", compression=0.5))
    with pytest.raises(ValueError, match="embedding.method"):
        elsa.train(_cfg(data, tmp_path / "o", method="bogus"))
    with pytest.raises(elsa.ElsaError, match="same items"):
        elsa.elsa_scores(torch.ones(2, 3), torch.ones(4, 2))
    with pytest.raises(elsa.ElsaError, match="at least one positive"):
        elsa.elsa_loss(torch.ones(2, 3), torch.tensor([[1.0, 0, 0], [0, 0, 0]]))
    with pytest.raises(SystemExit) as exc:
        elsa.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err
