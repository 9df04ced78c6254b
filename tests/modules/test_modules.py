"""The CEL module against manual computations, and the baselines."""
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cel_torchrec.modules import (ClusteredEmbeddingBagCollection, ClusteringConfig,
                                  FullEmbeddingBagCollection, HashedEmbeddingBagCollection,
                                  QREmbeddingBagCollection, hash_ids)
from tests.conftest import user_item_kjt, user_item_tables

D = 4


def tables(users=7, items=9):
    return user_item_tables(users, items, D)


kjt = user_item_kjt


def make_cebc(grad_average="batch"):
    torch.manual_seed(0)
    m = ClusteredEmbeddingBagCollection(tables(), {"item": ClusteringConfig(max_clusters=5, grad_average=grad_average)})
    state = m.cluster_states["item"]
    state.assignment.copy_(torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1], dtype=torch.int32))
    state.num_active = 3
    return m


def test_output_equals_manual_gather():
    m = make_cebc()
    users, items = [0, 3, 6, 1], [8, 5, 0, 2]
    out = m(kjt(users, items)).to_dict()
    cluster_table = m.table_weight("item")
    assignment = m.cluster_states["item"].assignment.long()
    assert torch.allclose(out["item_id"], cluster_table[assignment[torch.tensor(items)]])
    assert torch.allclose(out["user_id"], m.table_weight("user")[torch.tensor(users)])
    assert m.table_weight("item").shape == (5, D)   # capacity rows, not 9 entity rows


def test_remap_gives_the_cluster_ids_the_table_looks_up():
    m = make_cebc()
    users, items = [0, 3, 6, 1], [8, 5, 0, 2]
    remapped = m.remap(kjt(users, items)).to_dict()
    assert remapped["item_id"].values().tolist() == [1, 2, 0, 1]      # assignment[items]
    assert remapped["user_id"].values().tolist() == users             # unclustered: unchanged


@pytest.mark.parametrize("mode", ["batch", "members", "none"])
def test_cluster_gradient_averaging(mode):
    m = make_cebc(mode)
    m.train()
    items = [0, 1, 1, 2, 5, 5]
    out = m(kjt([0] * 6, items)).to_dict()["item_id"]
    upstream = torch.randn(6, D)
    (out * upstream).sum().backward()
    grad = m.table_weight("item").grad
    cluster = m.cluster_states["item"].assignment.long()[torch.tensor(items)]
    members = torch.bincount(m.cluster_states["item"].assignment.long(), minlength=5).float()
    for k in range(3):
        rows = cluster == k
        if mode == "members":
            denom = members[k]
        elif mode == "batch":
            denom = float(len(set(torch.tensor(items)[rows].tolist())))
        else:
            denom = 1.0
        expected = upstream[rows].sum(0) / denom if rows.any() else torch.zeros(D)
        assert torch.allclose(grad[k], expected, atol=1e-6), (k, grad[k], expected)


def test_window_records_unscaled_per_entity_gradients_and_split_copies_rows():
    m = make_cebc("members")
    m.train()
    st = m.cluster_states["item"]
    st.entity_interactions.copy_(torch.tensor([5, 5, 1, 1, 1, 0, 0, 5, 1]))  # cluster 0 busiest
    candidates = m.begin_split_window("item")
    assert candidates.tolist() == [0]
    items = [0, 1, 7, 0, 2]
    out = m(kjt([0] * 5, items)).to_dict()["item_id"]
    upstream = torch.tensor([[1., 0, 0, 0], [-1, 0, 0, 0], [0.2, 0, 0, 0], [1, 0, 0, 0], [9, 9, 9, 9]])
    (out * upstream).sum().backward()
    cand, entities, grads = m.window_gradients("item")
    got = dict(zip(entities.tolist(), grads.tolist()))
    assert set(got) == {0, 1, 7}
    assert got[0] == [2, 0, 0, 0] and got[1] == [-1, 0, 0, 0]
    assert torch.allclose(torch.tensor(got[7]), torch.tensor([0.2, 0, 0, 0]))
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    opt.step()
    before = m.table_weight("item").detach().clone()
    exp_avg_before = opt.state[m.table_weight("item")]["exp_avg"].clone()
    plan = m.split("item", optimizer=opt)
    assert plan.parents.tolist() == [0] and plan.children.tolist() == [3]
    assert st.num_active == 4
    st.check_invariants()
    # entity 1 (negative projection) left for the new cluster; the child copies row and state
    assert int(st.assignment[1]) == 3 and int(st.assignment[0]) == 0
    assert torch.equal(m.table_weight("item")[3], before[0])
    assert torch.equal(opt.state[m.table_weight("item")]["exp_avg"][3], exp_avg_before[0])


def test_bad_ids_are_rejected():
    m = make_cebc()
    with pytest.raises(IndexError, match="item_id"):
        m(kjt([0], [9]))
    m.train()
    bag = KeyedJaggedTensor.from_lengths_sync(keys=["user_id", "item_id"], values=torch.tensor([0, 1, -1]),
                                              lengths=torch.tensor([1, 2]))
    with pytest.raises(IndexError, match=r"item_id.*\[-1, 1\]"):       # multi-hot bags too
        m(bag)


def test_unclustered_features_keep_their_weights():
    """A weighted collection with no clustered table behaves as the stock weighted one."""
    weighted = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id"], values=torch.tensor([0, 1, 2, 3]),
        lengths=torch.ones(4, dtype=torch.long), weights=torch.tensor([1.0, 1.0, 0.5, 2.0]))
    plain = ClusteredEmbeddingBagCollection(tables(), {}, is_weighted=True)
    out = plain(weighted).to_dict()["item_id"]
    rows = plain.table_weight("item")
    assert torch.allclose(out, torch.stack([0.5 * rows[2], 2.0 * rows[3]]))


def test_a_table_shared_by_two_features_counts_both_in_the_loss_statistics():
    """The loss criterion sees the clusters of every feature of a shared table, not the last's."""
    torch.manual_seed(0)
    shared = [EmbeddingBagConfig(name="user", embedding_dim=D, num_embeddings=7, feature_names=["user_id"]),
              EmbeddingBagConfig(name="item", embedding_dim=D, num_embeddings=9,
                                 feature_names=["item_id", "other_item_id"])]
    m = ClusteredEmbeddingBagCollection(shared, {"item": ClusteringConfig(max_clusters=5, split_criterion="loss")})
    state = m.cluster_states["item"]
    state.assignment.copy_(torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1], dtype=torch.int32))
    state.num_active = 3
    m.train()
    m.begin_split_window("item")
    keys = ["user_id", "item_id", "other_item_id"]
    # item_id always in cluster 1; other_item_id in cluster 2, then in cluster 0: with both
    # features counted, cluster 1 carries both batches' losses and is chosen; counting only the
    # last feature would pick 2 or 0
    for items, others in (([2, 3], [5, 6]), ([4, 8], [0, 1])):
        batch = KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=torch.tensor([0, 1, *items, *others]),
            lengths=torch.ones(6, dtype=torch.long))
        out = m(batch).to_dict()
        losses = ((out["item_id"] + out["other_item_id"]) * out["user_id"]).sum(1) ** 2 + 1.0
        losses.sum().backward()
        m.observe_losses(losses.detach())
    assert m.begin_split_window("item").tolist() == [1]


@pytest.mark.parametrize("field,value", [("grad_average", "mean"), ("split_criterion", "size"),
                                         ("split_method", "kmeans"), ("unseen_policy", "nearest"),
                                         ("split_gradient", "max")])
def test_a_clustering_choice_outside_its_literal_type_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ClusteringConfig\.{field}: '{value}' is not one of"):
        ClusteringConfig(max_clusters=4, **{field: value})
    ClusteringConfig(max_clusters=4)               # the defaults are inside their types


def test_embedding_bytes():
    m = make_cebc()
    assert m.embedding_bytes() == (7 * D + 5 * D) * 4 + 9 * 4
    full = FullEmbeddingBagCollection(tables=tables())
    assert full.embedding_bytes() == (7 + 9) * D * 4


def test_hashing_baseline():
    h = HashedEmbeddingBagCollection(tables(items=1000), {"item": 16})
    ids = torch.arange(1000)
    hashed = hash_ids(ids, 16)
    assert int(hashed.min()) >= 0 and int(hashed.max()) < 16
    assert len(torch.unique(hashed)) == 16
    out = h(kjt([0, 1, 2], [5, 500, 999])).to_dict()["item_id"]
    w = h._embedding_bag_collection.embedding_bags["item"].weight
    assert torch.allclose(out, w[hash_ids(torch.tensor([5, 500, 999]), 16, salt=1)])
    assert h.embedding_bytes() == (7 + 16) * D * 4


def test_qr_baseline():
    q = QREmbeddingBagCollection(tables(items=10), {"item": 4})
    out = q(kjt([0, 1], [9, 2])).to_dict()
    bags = q._embedding_bag_collection.embedding_bags
    expected = bags["item__q"].weight[torch.tensor([2, 0])] * bags["item__r"].weight[torch.tensor([1, 2])]
    assert torch.allclose(out["item_id"], expected)
    assert torch.allclose(out["user_id"], bags["user"].weight[torch.tensor([0, 1])])
    assert q.embedding_bytes() == (7 + 3 + 4) * D * 4


@pytest.mark.parametrize("criterion", ["grad_norm", "loss", "mean_loss"])
def test_statistic_criteria_first_window_then_their_window_sums(criterion):
    """The criteria that read per-cluster sums open their first window with no statistics
    (zeros: the lowest eligible id), then pick the cluster whose members had gradient / loss."""
    torch.manual_seed(0)
    m = ClusteredEmbeddingBagCollection(tables(), {"item": ClusteringConfig(
        max_clusters=5, split_criterion=criterion)})
    state = m.cluster_states["item"]
    state.assignment.copy_(torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1], dtype=torch.int32))
    state.num_active = 3
    m.train()
    assert m.begin_split_window("item").tolist() == [0]
    users, items = [0, 1, 2], [5, 6, 5]                 # only cluster 2's members
    out = m(kjt(users, items)).to_dict()
    pred = (out["user_id"] * out["item_id"]).sum(1)
    losses = (pred - 3.0) ** 2
    losses.sum().backward()
    m.observe_losses(losses.detach())
    assert m.begin_split_window("item").tolist() == [2]
