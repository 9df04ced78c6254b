"""Multi-hot and weighted clustered features against a brute-force per-id computation: pooled
values, each id's gradient share (split windows, per-cluster averaging, the table gradient),
interaction counts and loss statistics, under SUM, MEAN and weighted SUM pooling."""
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig

D, TAGS, CAP = 4, 11, 6
ASSIGN = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 0, 1], dtype=torch.int32)
# samples 0..3: bags of 2, 0, 3 (a repeated id) and 1 ids; a second feature on the same table
TAG_IDS, TAG_LEN = [1, 4, 5, 5, 8, 10], [2, 0, 3, 1]
GENRE_IDS, GENRE_LEN = [0, 7, 7, 3, 2], [1, 2, 0, 2]
TAG_W, GENRE_W = [0.5, 2.0, 1.0, 1.5, -1.0, 0.25], [1.0, 3.0, 0.5, 2.0, 1.0]


def build(pooling=PoolingType.SUM, grad_average="batch", weighted=False, split_criterion="interactions"):
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="tag", embedding_dim=D, num_embeddings=TAGS,
                                 feature_names=["tags", "genres"], pooling=pooling)]
    m = ClusteredEmbeddingBagCollection(
        tables, {"tag": ClusteringConfig(max_clusters=CAP, grad_average=grad_average,
                                         split_criterion=split_criterion)}, is_weighted=weighted)
    state = m.cluster_states["tag"]
    state.assignment.copy_(ASSIGN)
    state.num_active = 4
    m.train()
    return m


def batch(weighted=False):
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["tags", "genres"], values=torch.tensor(TAG_IDS + GENRE_IDS),
        lengths=torch.tensor(TAG_LEN + GENRE_LEN),
        weights=torch.tensor(TAG_W + GENRE_W) if weighted else None)


def per_id(pooling, weighted):
    """Brute force, per (feature, id): (feature, sample, entity, share) for every id."""
    out = []
    for name, ids, lens, w in (("tags", TAG_IDS, TAG_LEN, TAG_W), ("genres", GENRE_IDS, GENRE_LEN, GENRE_W)):
        j = 0
        for s, n in enumerate(lens):
            for _ in range(n):
                share = w[j] if weighted else 1.0
                if pooling == PoolingType.MEAN:
                    share /= n
                out.append((name, s, ids[j], share))
                j += 1
    return out


CASES = [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)]


@pytest.mark.parametrize("grad_average", ["batch", "members", "none"])
@pytest.mark.parametrize("pooling,weighted", CASES)
def test_values_gradients_and_window_follow_each_ids_share(pooling, weighted, grad_average):
    m = build(pooling, grad_average, weighted)
    candidates = m.begin_split_window("tag")          # candidates: clusters by interactions
    w = m.table_weight("tag")
    upstream = {"tags": torch.randn(4, D), "genres": torch.randn(4, D)}
    out = m(batch(weighted)).to_dict()
    loss = sum((out[f] * upstream[f]).sum() for f in out)
    loss.backward()

    rows = w.detach()
    ids = per_id(pooling, weighted)
    members = torch.bincount(ASSIGN.long(), minlength=CAP)
    distinct = {k: len({e for _, _, e, _ in ids if int(ASSIGN[e]) == k}) for k in range(CAP)}
    expected_out = {f: torch.zeros(4, D) for f in upstream}
    expected_grad = torch.zeros(CAP, D)
    window = {}
    for f, s, e, share in ids:
        k = int(ASSIGN[e])
        expected_out[f][s] += share * rows[k]
        g = share * upstream[f][s]                    # this id's share of its bag's gradient
        scale = {"batch": 1.0 / distinct[k], "members": 1.0 / int(members[k]), "none": 1.0}[grad_average]
        expected_grad[k] += scale * g
        if k in candidates.tolist():
            window[e] = window.get(e, torch.zeros(D)) + g
    for f in upstream:
        assert torch.allclose(out[f], expected_out[f], atol=1e-6), f
    assert torch.allclose(w.grad, expected_grad, atol=1e-5)
    _, entities, grads, counts = m.window_rows("tag")
    assert sorted(window) == entities.tolist()
    assert torch.allclose(grads, torch.stack([window[e] for e in sorted(window)]), atol=1e-5)
    occurrences = torch.bincount(torch.tensor([e for _, _, e, _ in ids]), minlength=TAGS)
    assert torch.equal(m.cluster_states["tag"].entity_interactions.long(), occurrences)


def test_eval_pools_like_training_and_empty_bags_give_zeros():
    m = build(PoolingType.MEAN)
    train = m(batch()).to_dict()
    m.eval()
    with torch.no_grad():
        ev = m(batch()).to_dict()
    for f in train:
        assert torch.allclose(train[f], ev[f], atol=1e-6)
    assert torch.equal(ev["tags"][1], torch.zeros(D))     # an empty bag pools to zeros


def test_loss_statistics_give_every_id_its_bags_loss():
    m = build(split_criterion="loss")
    m(batch())
    per_sample = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    m.observe_losses(per_sample)
    expected = torch.zeros(CAP)
    for _, s, e, _ in per_id(PoolingType.SUM, False):
        expected[int(ASSIGN[e])] += per_sample[s]
    assert torch.allclose(m._cluster_loss_sum["tag"], expected)


def test_weights_are_honoured_or_refused_never_ignored():
    with pytest.raises(ValueError, match="is_weighted=False"):
        build()(batch(weighted=True))
    with pytest.raises(ValueError, match="carries no weights"):
        build(weighted=True)(batch())
    with pytest.raises(ValueError, match="weighted MEAN"):
        build(PoolingType.MEAN, weighted=True)
