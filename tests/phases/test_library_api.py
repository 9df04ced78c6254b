"""The cluster phases as a library API (`cel_torchrec.phases`): any table names, a table
looked up by several features, a model given as `model(pooled, dense) -> pred`, no trainer."""
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig
from cel_torchrec.phases import (exact_proposal, lite_proposal, reassign_losses,
                                 resolve_reassign_mode, run_reassignment)

D = 4
KEYS = ["viewer", "watched", "also_watched"]


def collection(movies=30, clusters=4, seed=0):
    """A `person` table and a clustered `movie` table that two features look up."""
    torch.manual_seed(seed)
    tables = [EmbeddingBagConfig(name="person", embedding_dim=D, num_embeddings=12, feature_names=["viewer"]),
              EmbeddingBagConfig(name="movie", embedding_dim=D, num_embeddings=movies,
                                 feature_names=["watched", "also_watched"])]
    emb = ClusteredEmbeddingBagCollection(tables, {"movie": ClusteringConfig(max_clusters=clusters)})
    state = emb.cluster_states["movie"]
    state.assignment.copy_(torch.arange(movies, dtype=torch.int32) % clusters)
    state.num_active = clusters
    with torch.no_grad():
        emb.table_weight("movie").normal_()
        emb.table_weight("person").normal_()
    return emb


class TwoMovieModel(torch.nn.Module):
    """pred = viewer . (watched + 0.5 also_watched) + a small nonlinearity (no linear form)."""

    def forward(self, pooled, dense):
        v = pooled["viewer"]
        return (v * (pooled["watched"] + 0.5 * pooled["also_watched"])).sum(1) + 0.1 * torch.tanh(v.sum(1))


def data(n=120, movies=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    viewer = torch.randint(0, 12, (n,), generator=g)
    watched = torch.randint(0, movies, (n,), generator=g)
    also = torch.randint(0, movies, (n,), generator=g)
    label = torch.randn(n, generator=g)
    return viewer, watched, also, label


def batches(d, size=40):
    viewer, watched, also, label = d
    for s in range(0, label.numel(), size):
        sl = slice(s, s + size)
        b = label[sl].numel()
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=KEYS, values=torch.cat([viewer[sl], watched[sl], also[sl]]),
            lengths=torch.ones(3 * b, dtype=torch.long))
        yield kjt, None, label[sl]


def brute_force_losses(emb, model, d):
    """Per movie and cluster: the summed loss over every sample where the movie occurs, in
    either feature, with that occurrence's embedding replaced by the cluster row."""
    viewer, watched, also, label = d
    rows = emb.cluster_rows("movie")
    assignment = emb.cluster_states["movie"].assignment.long()
    person = emb.table_weight("person").detach()
    out = torch.zeros(emb.cluster_states["movie"].num_entities, rows.shape[0], dtype=torch.float64)
    for s in range(label.numel()):
        base = {"viewer": person[viewer[s]][None], "watched": rows[assignment[watched[s]]][None],
                "also_watched": rows[assignment[also[s]]][None]}
        for key, movie in (("watched", watched[s]), ("also_watched", also[s])):
            for k in range(rows.shape[0]):
                pred = model({**base, key: rows[k][None]}, None)
                out[movie, k] += float((pred[0] - label[s]) ** 2)
    return out


@torch.no_grad()
def test_reassign_losses_of_a_table_shared_by_two_features_equal_a_brute_force():
    emb, model, d = collection(), TwoMovieModel(), data()
    emb.eval()
    assert emb.table_features("movie") == ["watched", "also_watched"]
    seen, got = reassign_losses(emb, model, batches(d), "movie", "mse")
    want = brute_force_losses(emb, model, d)
    occurs = torch.unique(torch.cat([d[1], d[2]]))
    assert torch.equal(seen, occurs)
    assert torch.allclose(got, want[seen], rtol=1e-4, atol=1e-4)
    # counts: one interaction per occurrence in either feature
    s, best, gain, counts, _, _ = exact_proposal(emb, model, lambda: batches(d), "movie", "mse",
                                                 memory_bytes=8 * 30)       # one cluster a block
    assert torch.equal(counts, torch.bincount(torch.cat([d[1], d[2]]), minlength=30)[seen].int())
    assert torch.equal(best, want[seen].argmin(1))


def test_lite_covering_every_cluster_equals_exact_on_a_shared_table():
    emb, model, d = collection(seed=3), TwoMovieModel(), data(seed=4)
    gen = lambda: torch.Generator().manual_seed(2)      # noqa: E731
    import copy
    exact, _ = run_reassignment(copy.deepcopy(emb), model, lambda: batches(d), "movie", loss="mse",
                                generator=gen(), mode="exact")
    lite, rep = run_reassignment(copy.deepcopy(emb), model, None, "movie", loss="mse",
                                 generator=gen(), mode="lite", recent=list(batches(d)), lite_k=4)
    assert rep.detail["mode"] == "lite" and rep.table == "movie"
    assert torch.equal(lite.new_assignment, exact.new_assignment)
    emb.eval()
    seen, best, gain, counts, _ = lite_proposal(emb, model, list(batches(d)), "movie", "mse", k=4)
    assert int(counts.sum()) == 2 * d[3].numel()          # both features' occurrences


def test_resolve_reassign_mode():
    emb = collection()
    assert resolve_reassign_mode("auto", emb) == "exact"          # 30 x 4 cells
    assert resolve_reassign_mode("lite", emb) == "lite"
    assert resolve_reassign_mode("auto", None) is None
    with pytest.raises(ValueError, match="exact|lite|auto"):
        resolve_reassign_mode("fast", emb)
    with pytest.raises(KeyError, match="not a clustered table"):
        emb.table_features("person")
