"""The trainer's reassignment pass: the MF matmul path and the generic batched-forward path
give the exact per-entity, per-cluster training loss (checked against brute force)."""
import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig
from trainer.config import ModelConfig
from trainer.dist import DistEnv
from trainer.models import build_model, embedding_dim_for
from cel_torchrec.phases import reassign_losses, run_reassignment
from tests.conftest import scatter_clusters

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


class NoLinearForm(nn.Module):
    """Hides `linear_form`, forcing the generic candidate-forward path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, embeddings, dense=None):
        return self.inner(embeddings, dense)


def setup(model_name, seed=0, users=9, items=11, clusters=4):
    torch.manual_seed(seed)
    mcfg = ModelConfig(name=model_name, embedding_dim=7, hidden=[8])
    dim = embedding_dim_for(mcfg)
    tables = [EmbeddingBagConfig(name="user", embedding_dim=dim, num_embeddings=users, feature_names=["user_id"]),
              EmbeddingBagConfig(name="item", embedding_dim=dim, num_embeddings=items, feature_names=["item_id"])]
    emb = ClusteredEmbeddingBagCollection(tables, {"item": ClusteringConfig(max_clusters=6)})
    scatter_clusters(emb, "item", clusters, items)
    model = build_model(mcfg, seed=seed)
    n = 60
    u, i = torch.randint(0, users, (n,)), torch.randint(0, items - 2, (n,))   # last 2 items unseen
    y = torch.randint(1, 6, (n,)).float()
    return emb, model, (u, i, y)


def brute_force(emb, model, data):
    u, i, y = data
    st = emb.cluster_states["item"]
    rows = emb.cluster_rows("item")
    user_rows = emb.table_weight("user").detach()
    seen = torch.unique(i)
    out = torch.zeros(len(seen), st.num_active, dtype=torch.float64)
    with torch.no_grad():
        for r, e in enumerate(seen.tolist()):
            mask = i == e
            for k in range(st.num_active):
                embs = {"user_id": user_rows[u[mask]], "item_id": rows[k].expand(int(mask.sum()), -1)}
                out[r, k] = ((model(embs, None) - y[mask]) ** 2).sum()
    return seen, out


def _batches(data, size=16):
    u, i, y = data
    for s in range(0, len(y), size):
        kjt = KeyedJaggedTensor(keys=["user_id", "item_id"], values=torch.cat([u[s:s + size], i[s:s + size]]),
                                lengths=torch.ones(2 * len(u[s:s + size]), dtype=torch.int32))
        yield kjt, None, y[s:s + size]


@pytest.mark.parametrize("model_name", ["mf", "neumf", "two_tower"])
def test_reassign_losses_equal_brute_force(model_name):
    emb, model, data = setup(model_name)
    emb.eval()
    seen_bf, expected = brute_force(emb, model, data)
    seen, got = reassign_losses(emb, model, _batches(data), "item", "mse", ENV)
    assert torch.equal(seen, seen_bf)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3)
    if model_name == "mf":      # the matmul path and the generic path agree
        seen2, generic = reassign_losses(emb, NoLinearForm(model), _batches(data), "item", "mse", ENV)
        assert torch.equal(seen2, seen) and torch.allclose(generic, got, rtol=1e-4, atol=1e-3)
    # padding batches (valid=False) from a multi-rank pass add nothing
    padded = [(*b, True) for b in _batches(data)] + [(*next(_batches(data)), False)]
    _, with_pad = reassign_losses(emb, model, padded, "item", "mse", ENV)
    assert torch.allclose(with_pad, got)


def test_run_reassignment_moves_entities_to_their_best_cluster():
    emb, model, data = setup("mf", seed=3)
    seen, losses = brute_force(emb, model, data)
    plan, report = run_reassignment(emb, model, _batches(data), "item", loss="mse", env=ENV,
                                    keep_prob=0.0, generator=torch.Generator().manual_seed(0),
                                    optimizer=None)
    st = emb.cluster_states["item"]
    st.check_invariants()
    best = losses.argmin(1)
    moved_or_kept = st.assignment.long()[seen]
    # every entity with data is in its best cluster unless kept to avoid emptying one
    assert int((moved_or_kept != best).sum()) == report.detail["kept_to_avoid_empty"]
    assert report.kind == "reassign" and report.detail["entities_with_data"] == len(seen)
