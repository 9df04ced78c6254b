"""The compact methods of `cel_torchrec.modules.compact` (sparse top-k rows, CCE, CERP): their
lookups equal their definitions, their phases do what the papers say, and their byte counts fit
the budgets `embedding.compression` sets."""
import math

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cel_torchrec.modules.compact import (CCEEmbeddingBagCollection, CCEShape,
                                          CERPEmbeddingBagCollection, CERPShape,
                                          SparseEmbeddingBagCollection, cce_shape_for,
                                          cerp_shape_for, kmeans, lookup_exported, salted_hash,
                                          sparse_k_for)

D = 16


def _tables(n=500, d=D):
    return [EmbeddingBagConfig(name="item", embedding_dim=d, num_embeddings=n, feature_names=["item_id"])]


def _kjt(ids):
    ids = torch.as_tensor(ids, dtype=torch.long)
    return KeyedJaggedTensor(keys=["item_id"], values=ids, lengths=torch.ones(ids.numel(), dtype=torch.long))


def _init(module, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    if hasattr(module, "after_init"):
        module.after_init()


def _export_lookup(module, ids):
    spec, arrays = module.export_table("item")
    return lookup_exported(spec, {k: torch.from_numpy(v) for k, v in arrays.items()}, ids), arrays


def test_sparse_rows_keep_the_k_largest_magnitudes_and_pass_gradients_straight_through():
    m = SparseEmbeddingBagCollection(_tables(), {"item": 3})
    _init(m)
    ids = torch.tensor([0, 7, 7, 499])
    out = m(_kjt(ids))["item_id"]
    w = m._embedding_bag_collection.embedding_bags["item"].weight
    assert ((out != 0).sum(1) == 3).all()
    top = w[ids].abs().topk(3, dim=1).indices
    torch.testing.assert_close(out.gather(1, top), w[ids].gather(1, top))
    out.sum().backward()                       # every entry of the looked-up rows gets gradient
    assert (w.grad[7] == 2).all() and (w.grad[1] == 0).all()
    got, arrays = _export_lookup(m, ids)
    torch.testing.assert_close(got, out.detach())
    assert sum(a.nbytes for a in arrays.values()) == m.embedding_bytes() == 500 * 3 * (4 + 1)


def test_sparse_k_fits_the_budget_and_says_when_it_cannot():
    for ratio in (2, 4, 10, 20):
        k = sparse_k_for(32, ratio)
        assert k * 5 <= 32 * 4 / ratio < (k + 1) * 5
    with pytest.raises(ValueError, match="out of the sparse method's reach"):
        sparse_k_for(32, 64)


def test_cce_rows_are_the_sum_of_two_tables_per_chunk():
    m = CCEEmbeddingBagCollection(_tables(), {"item": CCEShape(chunks=3, rows=20)})
    _init(m)
    assert m.chunk_widths("item") == [6, 5, 5]
    ids = torch.tensor([3, 3, 250, 499])
    out = m(_kjt(ids))["item_id"]
    maps, salts = m.item__map, m.item__salts
    want = torch.cat([m.params[f"item__cce{c}_a"][maps[c][ids].long()]
                      + m.params[f"item__cce{c}_b"][salted_hash(ids, 20, salts[c])] for c in range(3)], 1)
    torch.testing.assert_close(out, want)
    got, arrays = _export_lookup(m, ids)
    torch.testing.assert_close(got, out.detach())
    assert sum(a.nbytes for a in arrays.values()) == m.embedding_bytes() == 2 * 20 * D * 4 + 3 * 500 * 4


def test_cce_clustering_relearns_the_first_hash_and_keeps_the_vectors():
    """After the clustering the first table holds k-means centroids of the vectors, each id maps
    to its nearest one, and the second table the mean residual of its bucket under a fresh hash
    (checked against a brute-force recomputation), which rebuilds the vectors better than their
    mean; the optimizer's state of the rewritten tables is dropped; it stops after `until`."""
    n, rows = 2000, 16
    m = CCEEmbeddingBagCollection(_tables(n), {"item": CCEShape(chunks=2, rows=rows)}, until=0.5)
    _init(m)
    ids = torch.arange(n)
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    m.rows("item", ids[:64]).sum().backward()
    opt.step()
    with torch.no_grad():
        before = m.rows("item", ids).clone()
    old_salts = m.item__salts.clone()
    assert m.after_epoch(1, 4, opt) is not None             # 1/4 <= until
    assert not (m.item__salts == old_salts).any()
    with torch.no_grad():
        after = m.rows("item", ids)
        for c, cols in enumerate((slice(0, 8), slice(8, 16))):
            cent = m.params[f"item__cce{c}_a"]
            assert not opt.state.get(cent) and not opt.state.get(m.params[f"item__cce{c}_b"])
            near = m.item__map[c].long()
            d = torch.cdist(before[:, cols], cent)
            assert torch.allclose(d.gather(1, near[:, None]).squeeze(1), d.min(1).values, atol=1e-5)
            bucket = salted_hash(ids, rows, m.item__salts[c])
            res = before[:, cols] - cent[near]
            mean = torch.zeros(rows, 8).index_add_(0, bucket, res) / torch.bincount(
                bucket, minlength=rows).clamp_min(1)[:, None]
            torch.testing.assert_close(after[:, cols], cent[near] + mean[bucket])
        spread = ((before - before.mean(0)) ** 2).sum(1).mean()
        assert ((after - before) ** 2).sum(1).mean() < 0.8 * spread
    assert m.after_epoch(3, 4, opt) is None                 # 3/4 > until: no more clustering
    assert int(m.item__clusterings) == 1


def test_kmeans_finds_planted_centroids():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 4, generator=g) * 10
    x = centers.repeat(200, 1) + 0.1 * torch.randn(1000, 4, generator=g)
    got = kmeans(x, 10, 20, torch.Generator().manual_seed(3))     # 2x the planted count
    assert (torch.cdist(centers, got).min(1).values < 0.5).all()     # every planted centre found
    assert (torch.cdist(got, centers).min(1).values < 0.5).all()     # no centroid between them


def test_cce_shape_fits_the_budget_with_its_maps():
    for n, ratio in ((1682, 4), (1682, 16), (100_000, 10)):
        chunks, rows = cce_shape_for(n, 32, ratio, 4)
        total = 2 * rows * 32 * 4 + chunks * n * 4
        assert total <= n * 32 * 4 / ratio and rows >= 1
    assert cce_shape_for(1682, 32, 16, 4)[0] == 1           # maps halve the chunks to fit
    with pytest.raises(ValueError, match="out of CCE's reach"):
        cce_shape_for(1682, 32, 64, 4)


def test_cerp_rows_prune_by_soft_threshold_and_budget_mask():
    n, m_rows = 500, 23
    m = CERPEmbeddingBagCollection(_tables(n), {"item": CERPShape(collisions=m_rows, nonzeros=300)}, reg=0.5)
    _init(m)
    assert m.nonzeros("item") == 300                         # the budget mask after init
    assert torch.all(m.params["item__r_threshold"] == m.threshold_init)
    ids = torch.tensor([0, 22, 23, 499])
    m.train()
    out = m(_kjt(ids))["item_id"]
    soft = lambda part, r: (lambda w, t: torch.sign(w) * torch.relu(w.abs() - t))(
        m.params[f"item__{part}"][r], torch.sigmoid(m.params[f"item__{part}_threshold"]))
    p = soft("r", ids % m_rows) * m.item__r_mask[ids % m_rows]
    q = soft("q", ids // m_rows) * m.item__q_mask[ids // m_rows]
    torch.testing.assert_close(out, p + q)
    torch.testing.assert_close(m.penalty(), 0.5 * (p.abs() * q.abs()).sum(1).mean())
    # a raised threshold prunes: fewer non-zeros than the budget
    with torch.no_grad():
        m.params["item__r_threshold"].fill_(math.log(0.1 / 0.9))    # sigmoid = 0.1, about 1 std
        m.params["item__q_threshold"].fill_(math.log(0.1 / 0.9))
    m.refresh_masks()
    assert m.nonzeros("item") < 300
    m.eval()
    got, arrays = _export_lookup(m, ids)
    torch.testing.assert_close(got, m(_kjt(ids))["item_id"].detach())
    assert sum(a.nbytes for a in arrays.values()) == m.embedding_bytes()


def test_cerp_shape_fits_the_budget():
    for n, ratio in ((1682, 4), (1682, 16), (1682, 64), (100_000, 10)):
        m, nnz = cerp_shape_for(n, 32, ratio, 2.0)
        rows = m + -(-n // m)
        assert nnz * 5 + (rows + 2) * 4 <= n * 32 * 4 / ratio
        assert nnz >= 1


@pytest.mark.parametrize("method", ["sparse", "cce", "cerp"])
@pytest.mark.parametrize("ratio", [4, 16])
def test_embedding_compression_sizes_each_compact_method_within_its_budget(tmp_path, method, ratio):
    from trainer.builders import build_embedding_collection
    from trainer.config import load_config
    cfg = load_config(None, [f"embedding.method={method}", f"embedding.compression={ratio}",
                             "embedding.min_cardinality=100", "model.name=gmf", "model.embedding_dim=32"])
    if method == "sparse" and ratio == 16:
        assert sparse_k_for(32, 16) == 1
    emb = build_embedding_collection(cfg, 943, 1682, torch.device("cpu"))
    full = (943 + 1682) * 32 * 4
    # sparse moves in steps of one value + index per row (at 16x on 32-wide rows: 1 of 1.6)
    slack = (943 + 1682) * 5 if method == "sparse" else 0.2 * full / ratio
    assert full / ratio - slack < emb.embedding_bytes() <= full / ratio


def test_compact_methods_need_a_compression_and_one_process():
    from trainer.builders import build_embedding_collection
    from trainer.config import load_config
    from trainer.tables import fused_obstacles
    cfg = load_config(None, ["embedding.method=cce", "model.name=gmf"])
    with pytest.raises(ValueError, match="sized by embedding.compression"):
        build_embedding_collection(cfg, 943, 1682, torch.device("cpu"))
    cfg = load_config(None, ["embedding.method=cerp", "embedding.compression=8", "model.name=gmf",
                             "train.optimizer=adagrad"])
    emb = build_embedding_collection(cfg, 943, 1682, torch.device("cpu"))
    assert any("one process" in o for o in fused_obstacles(cfg, torch.device("cpu"), emb, 2))
