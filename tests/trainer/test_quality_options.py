"""Quality options of CEL (all default-off): per-entity bias outside the clusters, the policy for
entities without training data at reassignment, and their wiring through the trainer config."""
import pytest
import torch

from cel_torchrec.algorithm import decide_reassignment
from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig
from trainer.config import TrainConfig, apply_overrides
from trainer.dist import DistEnv
from trainer.builders import build_embedding_collection
from trainer.models import MatrixFactorization, NeuMF
from cel_torchrec.phases import reassign_losses
from tests.conftest import user_item_kjt, user_item_tables

D = 4   # MF with d = 3: columns 0..2 latent, column 3 bias


def tables(users=5, items=8):
    return user_item_tables(users, items, D)


kjt = user_item_kjt


def make(bias_column=3, unseen="stay"):
    torch.manual_seed(0)
    m = ClusteredEmbeddingBagCollection(tables(), {"item": ClusteringConfig(
        max_clusters=4, entity_bias_column=bias_column, unseen_policy=unseen)})
    st = m.cluster_states["item"]
    st.assignment.copy_(torch.tensor([0, 0, 1, 1, 2, 2, 0, 1], dtype=torch.int32))
    st.num_active = 3
    with torch.no_grad():
        m.entity_biases["item"].copy_(torch.arange(8, dtype=torch.float32) / 10)
    return m


def test_entity_bias_added_to_its_column_and_counted_in_bytes():
    m = make()
    items = [0, 5, 7, 3]
    out = m(kjt([0, 1, 2, 3], items)).to_dict()["item_id"]
    rows = m.table_weight("item")[m.cluster_states["item"].assignment.long()[torch.tensor(items)]]
    expect = rows.detach().clone()
    expect[:, 3] += torch.tensor(items, dtype=torch.float32) / 10
    assert torch.allclose(out, expect)
    plain = ClusteredEmbeddingBagCollection(tables(), {"item": ClusteringConfig(max_clusters=4)})
    assert m.embedding_bytes() == plain.embedding_bytes() + 8 * 4
    off = m.entity_offsets("item", torch.tensor(items))
    assert torch.allclose(off[:, 3], torch.tensor(items, dtype=torch.float32) / 10)
    assert torch.all(off[:, :3] == 0)
    assert plain.entity_offsets("item", torch.tensor(items)) is None


def test_entity_bias_gets_plain_per_sample_gradient():
    m = make()
    m.train()
    items = [0, 0, 5]
    out = m(kjt([0, 1, 2], items)).to_dict()["item_id"]
    out[:, 3].sum().backward()
    grad = m.entity_biases["item"].grad
    assert grad[0] == 2 and grad[5] == 1 and grad.sum() == 3


def test_bad_bias_column_and_policy_rejected():
    with pytest.raises(ValueError):
        ClusteredEmbeddingBagCollection(tables(), {"item": ClusteringConfig(max_clusters=4, entity_bias_column=D)})
    with pytest.raises(ValueError):
        ClusteredEmbeddingBagCollection(tables(), {"item": ClusteringConfig(max_clusters=4, unseen_policy="x")})


@pytest.mark.parametrize("linear", [True, False])
def test_reassign_losses_include_entity_bias(linear):
    """Both paths (MF closed form, generic forward) score `cluster row + own bias`."""
    m = make()
    model = MatrixFactorization(D - 1)
    model.set_global_bias(3.0)
    if not linear:
        model.linear_form = None      # force the generic repeated-forward path
    users, items = [0, 1, 2, 3, 4, 0], [0, 1, 5, 5, 7, 3]
    labels = torch.tensor([4.0, 3.0, 5.0, 1.0, 2.0, 4.0])
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    m.eval()
    seen, losses = reassign_losses(m, model, [(kjt(users, items), None, labels)], "item", "mse", env)
    # brute force: item i under cluster k
    u = m.table_weight("user").detach()
    c = m.table_weight("item").detach()[:3]
    b = m.entity_biases["item"].detach()
    want = torch.zeros(8, 3, dtype=torch.float64)
    for uu, ii, y in zip(users, items, labels):
        for k in range(3):
            e = c[k].clone()
            e[3] += b[ii]
            pred = (u[uu, :3] * e[:3]).sum() + u[uu, 3] + e[3] + 3.0
            want[ii, k] += float((pred - y) ** 2)
    assert seen.tolist() == [0, 1, 3, 5, 7]
    assert torch.allclose(losses, want[seen], atol=1e-4)


def test_unseen_entities_go_to_the_given_cluster_and_no_cluster_is_left_empty():
    assignment = torch.tensor([0, 0, 1, 1, 2, 2, 3], dtype=torch.int32)
    seen = torch.tensor([0, 1, 2, 3, 4])       # entities 5 and 6 have no data; 6 alone in cluster 3
    losses = torch.tensor([[0.0, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1]])
    plan = decide_reassignment(assignment, 4, seen, losses, keep_prob=0.0,
                               generator=torch.Generator().manual_seed(0), unseen_to=1)
    new = plan.new_assignment
    assert new[5] == 1 or int(plan.row_dst.numel()) > 0
    counts = torch.bincount(new.long(), minlength=4)
    assert bool((counts > 0).all())            # cluster 3 (emptied by the move) refilled
    assert 3 in plan.row_dst.tolist()
    # without the option, unseen entities stay put
    plan2 = decide_reassignment(assignment, 4, seen, losses, keep_prob=0.0,
                                generator=torch.Generator().manual_seed(0))
    assert plan2.new_assignment[5] == 2 and plan2.new_assignment[6] == 3


def test_trainer_config_wires_the_options():
    cfg = apply_overrides(TrainConfig(), ["model.name=mf", "model.embedding_dim=3",
                                          "cel.items.entity_bias=true",
                                          "cel.items.unseen_policy=largest"])
    emb = build_embedding_collection(cfg, num_users=5, num_items=8, device=torch.device("cpu"))
    assert "item" in emb.entity_biases and "user" not in emb.entity_biases
    assert torch.all(emb.entity_biases["item"] == 0)          # biases start at zero
    assert emb.clustering_config("item").entity_bias_column == 3
    assert emb.clustering_config("item").unseen_policy == "largest"
    default = build_embedding_collection(TrainConfig(), num_users=5, num_items=8,
                                         device=torch.device("cpu"))
    assert len(default.entity_biases) == 0
    with pytest.raises(ValueError):
        build_embedding_collection(apply_overrides(TrainConfig(), ["model.name=neumf",
                                                                  "cel.items.entity_bias=true"]),
                                   num_users=5, num_items=8, device=torch.device("cpu"))


def test_pooled_policy_sends_cold_entities_to_their_best_common_cluster():
    from cel_torchrec.phases import run_reassignment
    torch.manual_seed(0)
    m = ClusteredEmbeddingBagCollection(tables(), {"item": ClusteringConfig(
        max_clusters=4, entity_bias_column=None, unseen_policy="pooled", cold_interactions=2)})
    st = m.cluster_states["item"]
    st.assignment.copy_(torch.tensor([0, 0, 1, 1, 2, 2, 0, 1], dtype=torch.int32))
    st.num_active = 3
    with torch.no_grad():   # cluster biases 1, 3, 5 (bias column 3), latent part zero
        w = m.table_weight("item")
        w.zero_()
        w[:3, 3] = torch.tensor([1.0, 3.0, 5.0])
        m.table_weight("user").zero_()
    model = MatrixFactorization(D - 1)
    # items 0..3 warm (2 ratings each); items 4 and 5 cold (1 rating each, both near 5); 6, 7 unseen
    items = [0, 0, 1, 1, 2, 2, 3, 3, 4, 5]
    labels = torch.tensor([1.0, 1, 1, 1, 3, 3, 3, 3, 4.8, 5.2])
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    plan, _ = run_reassignment(m, model, [(kjt([0] * 10, items), None, labels)], "item",
                               loss="mse", env=env, keep_prob=0.0,
                               generator=torch.Generator().manual_seed(0), optimizer=None)
    new = plan.new_assignment.tolist()
    assert new[4] == new[5] == new[6] == new[7] == 2   # pooled cold losses: cluster bias 5 wins
    assert new[:4] == [0, 0, 1, 1]


def test_entity_bias_decay_adds_l2_gradient():
    m = ClusteredEmbeddingBagCollection(tables(), {"item": ClusteringConfig(
        max_clusters=4, entity_bias_column=3, entity_bias_decay=0.5)})
    with torch.no_grad():
        m.entity_biases["item"].fill_(2.0)
    m.train()
    out = m(kjt([0], [1])).to_dict()["item_id"]
    out[:, 3].sum().backward()
    g = m.entity_biases["item"].grad
    assert g[1] == pytest.approx(1.0 + 0.5 * 2.0) and g[0] == pytest.approx(0.5 * 2.0)
