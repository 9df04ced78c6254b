"""CTR models over many categorical features (DLRM from TorchRec's arches, DeepFM) and the
per-table byte budget (`embedding.compression`)."""
import itertools

import pytest
import torch

from trainer.builders import build_embedding_collection, compressed_rows, qr_collisions_for, table_specs
from trainer.config import ModelConfig, TrainConfig, apply_overrides
from trainer.models import DeepFM, DLRM, build_model, embedding_dim_for

FEATURES = ["user_id", "item_id", "sparse_a", "sparse_b"]


def cfg(name, d=8):
    return ModelConfig(name=name, embedding_dim=d, hidden=[16, 8], dense_hidden=[8])


def embeddings(batch, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, width, generator=g) for k in FEATURES}


@pytest.mark.parametrize("name,cls", [("dlrm", DLRM), ("deepfm", DeepFM)])
@pytest.mark.parametrize("num_dense", [0, 3])
def test_ctr_models_give_one_logit_per_sample_for_any_batch(name, cls, num_dense):
    model = build_model(cfg(name), num_dense=num_dense, seed=0, features=FEATURES)
    assert isinstance(model, cls)
    width = embedding_dim_for(cfg(name))
    for batch in (1, 7):
        dense = torch.randn(batch, num_dense) if num_dense else None
        out = model(embeddings(batch, width), dense)
        assert out.shape == (batch,)
    # every feature matters
    embs, dense = embeddings(5, width), torch.randn(5, num_dense) if num_dense else None
    base = model(embs, dense)
    for f in FEATURES:
        changed = dict(embs, **{f: embs[f] + 1.0})
        assert not torch.allclose(model(changed, dense), base), f
    with pytest.raises(ValueError, match="categorical features"):
        build_model(cfg(name))


def test_deepfm_is_first_order_plus_fieldwise_fm_plus_mlp():
    model = build_model(cfg("deepfm", d=3), seed=0, features=FEATURES)
    width = embedding_dim_for(cfg("deepfm", d=3))
    assert width == 4                                   # d + the first-order column
    embs = embeddings(6, width)
    for p in model.deep.parameters():                   # silence the MLP: FM + first order
        torch.nn.init.zeros_(p)
    out = model(embs, None)
    want = torch.zeros(6)
    for f in FEATURES:
        want += embs[f][:, 3]
    for a, b in itertools.combinations(FEATURES, 2):
        want += (embs[a][:, :3] * embs[b][:, :3]).sum(1)
    torch.testing.assert_close(out, want)


def test_compression_splits_the_byte_budget_by_cardinality():
    """At 10x, every large table's bytes come to about a tenth of full under each method; the
    small table stays full."""
    specs = [("user", "user_id", 50_000), ("item", "item_id", 20_000), ("sparse_a", "sparse_a", 300)]
    for method in ("cel", "hash", "qr"):
        c = apply_overrides(TrainConfig(), ["model.name=dlrm", "model.embedding_dim=16",
                                            f"embedding.method={method}",
                                            "embedding.compression=10"])
        emb = build_embedding_collection(c, 50_000, 20_000, torch.device("cpu"),
                                         sparse_features={"sparse_a": 300})
        full = sum(n for _, _, n in specs) * 16 * 4
        ratio = full / emb.embedding_bytes()
        assert 9.0 < ratio < 11.0, (method, ratio)
        assert "sparse_a" not in compressed_rows(c, specs, 16)
    c = apply_overrides(TrainConfig(), ["model.name=dlrm", "model.embedding_dim=16",
                                        "embedding.compression=20"])
    with pytest.raises(ValueError, match="out of CEL's reach"):        # the map alone is 1/16
        compressed_rows(c, specs, 16)
    # narrow maps: 20x fits (an int16 map is 1/32 of a 16-wide row), at the bytes asked for
    c = apply_overrides(c, ["cel.items.map_dtype=auto"])
    rows = compressed_rows(c, specs, 16)
    emb = build_embedding_collection(c, 50_000, 20_000, torch.device("cpu"),
                                     sparse_features={"sparse_a": 300})
    assert {t: emb.cluster_states[t].assignment.dtype for t in rows} == {
        t: (torch.int8 if k <= 128 else torch.int16) for t, k in rows.items()}
    large = (50_000 + 20_000) * 16 * 4                   # sparse_a (300 rows) stays full
    ratio = large / (emb.embedding_bytes() - 300 * 16 * 4)
    assert 20.0 <= ratio < 20.5, ratio                 # within the budget, and close to it
    with pytest.raises(ValueError, match="an int8 assignment map alone is 1/64"):
        compressed_rows(apply_overrides(c, ["embedding.compression=80"]), specs, 16)


def test_cel_clusters_fit_their_budget_with_the_widest_count():
    from trainer.builders import cel_clusters_for
    n, row = 1682, 128                                   # ML-100K items, 32 float32 columns
    for ratio in (4, 16, 64):
        for maps in ("int32", "auto"):
            k = cel_clusters_for(n, row, ratio, maps)
            width = 4 if maps == "int32" else (1 if k <= 128 else 2 if k <= 32768 else 4)
            if k:
                assert k * row + width * n <= n * row / ratio            # within the budget
            assert (k + 1) * row + width * n > n * row / ratio or k == n  # and the most that fit
    assert cel_clusters_for(n, row, 64) == 0 and cel_clusters_for(n, row, 64, "auto") == 13
    assert cel_clusters_for(n, row, 16, "auto") == 91 > cel_clusters_for(n, row, 16) == 52


def test_qr_collisions_fit_the_budget_or_take_the_fewest_rows():
    for n, budget in [(10_000, 1000.0), (10_000, 250.0), (5, 3.0), (1_000_000, 2500.0)]:
        m = qr_collisions_for(n, budget)
        rows = -(-n // m) + m
        assert rows <= budget or rows <= 2 * int(n ** 0.5) + 2, (n, budget, m)


def test_ctr_model_tables_cover_every_categorical_feature():
    c = apply_overrides(TrainConfig(), ["model.name=deepfm"])
    specs = table_specs(c, 10, 20, {"sparse_x": 5})
    assert [f for _, f, _ in specs] == ["user_id", "item_id", "sparse_x"]
    assert [f for _, f, _ in table_specs(TrainConfig(), 10, 20, {"sparse_x": 5})] == ["user_id", "item_id"]
