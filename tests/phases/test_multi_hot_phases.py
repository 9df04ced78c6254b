"""Reassignment of multi-hot, MEAN-pooled and weighted clustered features against brute force:
each id of a bag is one interaction of its entity, scored with only that id's row moved to the
candidate cluster (its bag's other ids and every other feature stay), exact and CEL-Lite."""
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig
from cel_torchrec.phases import lite_proposal, reassign_losses

D, TAGS, USERS, CAP, B = 4, 12, 5, 5, 7


class Model(torch.nn.Module):
    """Non-linear in the tag embedding: the generic (autograd / batched forward) path."""

    def forward(self, pooled, dense):
        return (pooled["tags"] * pooled["user_id"]).sum(1) + torch.tanh(pooled["tags"]).sum(1)


class LinearModel(torch.nn.Module):
    """Linear in the tag embedding, with `linear_form`: the closed-form path."""

    def forward(self, pooled, dense):
        return (pooled["tags"] * pooled["user_id"]).sum(1) + 0.3

    def linear_form(self, pooled, dense, feature):
        return pooled["user_id"], torch.full((pooled["user_id"].shape[0],), 0.3)


def build(pooling, weighted):
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="tag", embedding_dim=D, num_embeddings=TAGS,
                                 feature_names=["tags"], pooling=pooling),
              EmbeddingBagConfig(name="user", embedding_dim=D, num_embeddings=USERS,
                                 feature_names=["user_id"])]
    m = ClusteredEmbeddingBagCollection(tables, {"tag": ClusteringConfig(max_clusters=CAP)},
                                        is_weighted=weighted)
    state = m.cluster_states["tag"]
    state.assignment.copy_(torch.arange(TAGS, dtype=torch.int32) % 4)
    state.num_active = 4
    with torch.no_grad():
        m.table_weight("tag").normal_()
    m.eval()
    return m


def batches(weighted):
    """Bags of distinct ids (so moving an entity moves one id per bag), one empty bag."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(2):
        lengths = torch.tensor([2, 1, 3, 0, 2, 1, 3])
        tags = torch.cat([torch.randperm(TAGS, generator=g)[:n] for n in lengths.tolist()])
        users = torch.randint(0, USERS, (B,), generator=g)
        weights = None
        if weighted:
            weights = torch.cat([torch.rand(tags.numel(), generator=g) + 0.5, torch.ones(B)])
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["tags", "user_id"], values=torch.cat([tags, users]),
            lengths=torch.cat([lengths, torch.ones(B, dtype=torch.long)]), weights=weights)
        out.append((kjt, None, torch.randn(B, generator=g)))
    return out


def brute_force(m, model, data):
    """Per (entity, cluster): the summed loss of the entity's interactions with it moved."""
    state = m.cluster_states["tag"]
    base = state.assignment.clone()
    losses = torch.zeros(TAGS, state.num_active, dtype=torch.float64)
    for e in range(TAGS):
        for k in range(state.num_active):
            state.assignment.copy_(base)
            state.assignment[e] = k
            for kjt, dense, label in data:
                jt = kjt["tags"]
                has = torch.zeros(B, dtype=torch.bool)
                sample = torch.repeat_interleave(torch.arange(B), jt.lengths())
                has[sample[jt.values() == e]] = True
                with torch.no_grad():
                    pred = model(m(kjt).to_dict(), dense)
                losses[e, k] += ((pred - label) ** 2)[has].double().sum()
    state.assignment.copy_(base)
    return losses


CASES = [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)]


@pytest.mark.parametrize("model_cls", [Model, LinearModel])
@pytest.mark.parametrize("pooling,weighted", CASES)
def test_exact_reassignment_losses_move_one_id_of_its_bag(pooling, weighted, model_cls):
    m, model, data = build(pooling, weighted), model_cls(), batches(weighted)
    want = brute_force(m, model, data)
    seen, got = reassign_losses(m, model, data, "tag", "mse")
    assert seen.tolist() == [e for e in range(TAGS) if want[e].abs().sum() > 0]
    torch.testing.assert_close(got, want[seen], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_cls", [Model, LinearModel])
@pytest.mark.parametrize("pooling,weighted", CASES)
def test_lite_scores_its_candidates_exactly(pooling, weighted, model_cls):
    """With as many candidates as clusters, CEL-Lite's choice is the brute-force best."""
    m, model, data = build(pooling, weighted), model_cls(), batches(weighted)
    want = brute_force(m, model, data)
    seen, best, gain, counts, _ = lite_proposal(m, model, data, "tag", "mse", k=CAP, scoring="exact")
    current = m.cluster_states["tag"].assignment[seen].long()
    w = want[seen]
    assert torch.equal(best, w.argmin(1))
    torch.testing.assert_close(gain, w.gather(1, current[:, None])[:, 0] - w.min(1).values,
                               atol=1e-5, rtol=1e-5)
    occurrences = torch.bincount(torch.cat([kjt["tags"].values() for kjt, _, _ in data]),
                                 minlength=TAGS)
    assert torch.equal(counts.long(), occurrences[seen])
