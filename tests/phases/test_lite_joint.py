"""CEL-Lite over several clustered tables in one pass (`lite_proposals`), and its `linearised`
scoring: the joint pass gives each table the proposal it gets alone, its first pass runs one
model forward per batch whatever the number of tables, and linearised scoring equals a
brute-force per-interaction first-order expansion (and exact scoring for a model linear in the
row)."""
import copy

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig
from cel_torchrec.phases import (lite_proposal, lite_proposals, per_sample_loss,
                                 run_reassignment, run_reassignments)
from tests.conftest import scatter_clusters
from tests.trainer.test_phases import ENV, NoLinearForm, _batches
from trainer.config import ModelConfig
from trainer.models import build_model, embedding_dim_for

USERS, ITEMS = 13, 17


def setup(model_name: str, seed: int = 0):
    """user and item both clustered (5 and 4 active clusters), random rows, 80 ratings."""
    torch.manual_seed(seed)
    mcfg = ModelConfig(name=model_name, embedding_dim=7, hidden=[8])
    dim = embedding_dim_for(mcfg)
    tables = [EmbeddingBagConfig(name="user", embedding_dim=dim, num_embeddings=USERS, feature_names=["user_id"]),
              EmbeddingBagConfig(name="item", embedding_dim=dim, num_embeddings=ITEMS, feature_names=["item_id"])]
    emb = ClusteredEmbeddingBagCollection(tables, {"user": ClusteringConfig(max_clusters=6),
                                                   "item": ClusteringConfig(max_clusters=6)})
    for table, m in (("user", 5), ("item", 4)):
        scatter_clusters(emb, table, m)
    model = build_model(mcfg, seed=seed)
    n = 80
    data = (torch.randint(0, USERS, (n,)), torch.randint(0, ITEMS, (n,)),
            torch.randint(1, 6, (n,)).float())
    emb.eval()
    return emb, model, list(_batches(data, size=16))


class Counting(nn.Module):
    """Counts the forwards of the model it wraps (no linear form)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, embeddings, dense=None):
        self.calls += 1
        return self.inner(embeddings, dense)


def _same(a, b, atol=1e-6):
    seen_a, best_a, gain_a, counts_a, loss_a = a
    seen_b, best_b, gain_b, counts_b, loss_b = b
    assert torch.equal(seen_a, seen_b) and torch.equal(counts_a, counts_b)
    assert torch.equal(best_a, best_b)
    assert torch.allclose(gain_a, gain_b, atol=atol) and loss_a == pytest.approx(loss_b, abs=atol)


@pytest.mark.parametrize("scoring", ["exact", "linearised"])
@pytest.mark.parametrize("model_name", ["mf", "neumf"])
def test_joint_pass_gives_each_table_its_own_proposal(model_name, scoring):
    emb, model, recent = setup(model_name, seed=1)
    joint = lite_proposals(emb, model, recent, ["user", "item"], "mse", ENV, k=2, scoring=scoring)
    assert set(joint) == {"user", "item"}
    for table in ("user", "item"):
        _same(joint[table], lite_proposal(emb, model, recent, table, "mse", ENV, k=2,
                                          scoring=scoring))
        assert int(joint[table][3].sum()) == 80         # every rating is one interaction


def test_first_pass_runs_one_forward_per_batch_for_all_tables():
    """Linearised scoring of a model without a linear form: one forward (and one backward) per
    batch for both tables and nothing in the second pass while the cache holds every batch;
    exact scoring then runs (k + 1)-candidate forwards per batch and table."""
    emb, model, recent = setup("neumf", seed=2)
    counted = Counting(model)
    lite_proposals(emb, counted, recent, ["user", "item"], "mse", ENV, k=2, scoring="linearised")
    assert counted.calls == len(recent)
    counted.calls = 0
    lite_proposals(emb, counted, recent, ["user", "item"], "mse", ENV, k=2, scoring="linearised",
                   cache_bytes=0)                        # second pass differentiates again
    assert counted.calls == 2 * len(recent)
    counted.calls = 0
    lite_proposals(emb, counted, recent, ["user", "item"], "mse", ENV, k=2, scoring="exact")
    assert counted.calls == len(recent) + 2 * len(recent)   # first pass + one per table and batch


def test_linearised_equals_exact_for_a_model_linear_in_the_row():
    emb, model, recent = setup("mf", seed=3)
    generic = NoLinearForm(model)               # MF without its linear form: autograd path
    for table in ("user", "item"):
        exact = lite_proposal(emb, model, recent, table, "mse", ENV, k=3)
        _same(exact, lite_proposal(emb, generic, recent, table, "mse", ENV, k=3,
                                   scoring="linearised"), atol=1e-4)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_linearised_losses_equal_a_brute_force_first_order_expansion(loss):
    """NeuMF (nonlinear in the item row): for every interaction, its prediction expanded to
    first order in the item row by autograd on that one sample, the loss of the expansion at
    every active cluster, summed per item: Lite with every cluster as a candidate picks that
    sum's argmin, with that gain."""
    emb, model, recent = setup("neumf", seed=4)
    if loss == "bce":
        recent = [(kjt, dense, (y > 3).float()) for kjt, dense, y in recent]
    st = emb.cluster_states["item"]
    rows = emb.cluster_rows("item").detach()
    m = st.num_active
    seen, best, gain, counts, _ = lite_proposal(emb, model, recent, "item", loss, ENV, k=m,
                                                scoring="linearised")
    want = {int(e): torch.zeros(m, dtype=torch.float64) for e in seen}
    for kjt, dense, y in recent:
        pooled = emb(kjt).to_dict()
        for s, e in enumerate(kjt["item_id"].values().tolist()):
            one = {f: v[s:s + 1].detach() for f, v in pooled.items()}
            x = one["item_id"].clone().requires_grad_(True)
            pred = model({**one, "item_id": x}, None)
            (jac,) = torch.autograd.grad(pred.sum(), [x])
            for c in range(m):
                moved = pred.detach() + (jac * (rows[c] - x.detach())).sum()
                want[e][c] += float(per_sample_loss(moved, y[s:s + 1], loss).sum())
    for r, e in enumerate(seen.tolist()):
        current = int(st.assignment[e])
        assert int(best[r]) == int(torch.argmin(want[e]))
        assert float(gain[r]) == pytest.approx(float(want[e][current] - want[e].min()), abs=1e-4)


def test_run_reassignments_applies_every_tables_plan_and_reports_each():
    emb, model, recent = setup("neumf", seed=5)
    alone = {}
    for table in ("user", "item"):
        e = copy.deepcopy(emb)
        run_reassignment(e, model, None, table, loss="mse", generator=torch.Generator().manual_seed(0),
                         env=ENV, mode="lite", recent=recent, lite_k=2, lite_scoring="linearised")
        alone[table] = e.cluster_states[table].assignment.clone()
    joint = copy.deepcopy(emb)
    out = run_reassignments(joint, model, None, ["user", "item"], loss="mse",
                            generator=torch.Generator().manual_seed(0), env=ENV, mode="lite",
                            recent=recent, lite_k=2, lite_scoring="linearised")
    assert [rep.table for _, rep in out] == ["user", "item"]
    assert all(rep.detail["lite_scoring"] == "linearised" and rep.seconds > 0 for _, rep in out)
    # the user plan draws first from the shared generator, so it matches its solo run exactly
    assert torch.equal(joint.cluster_states["user"].assignment, alone["user"])
    assert sum(plan.num_moved for plan, _ in out) > 0
    with pytest.raises(ValueError, match="lite scoring"):
        run_reassignments(joint, model, None, ["item"], loss="mse", generator=torch.Generator(),
                          env=ENV, mode="lite", recent=recent, lite_scoring="taylor")
