"""trainer.models: shapes, the MF formula, gradients, overfitting a tiny problem, determinism."""
import pytest
import torch

from trainer.config import ModelConfig
from trainer.models import (MatrixFactorization, NeuMF, TwoTower, build_model,
                            embedding_dim_for)

NAMES = ["mf", "neumf", "two_tower"]


def cfg(name, d=8, hidden=(16, 8), dropout=0.0):
    return ModelConfig(name=name, embedding_dim=d, hidden=list(hidden), dropout=dropout)


def embeddings(batch, width, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, width, generator=g).requires_grad_(requires_grad)
            for k in ("user_id", "item_id")}


def test_embedding_dim_for():
    assert embedding_dim_for(cfg("mf", d=8)) == 12      # d + bias, padded to a multiple of 4
    assert embedding_dim_for(cfg("mf", d=7)) == 8
    assert embedding_dim_for(cfg("neumf", d=8)) == 8
    assert embedding_dim_for(cfg("two_tower", d=8)) == 8
    with pytest.raises(ValueError, match="model.name"):
        embedding_dim_for(cfg("nope"))


def test_build_model_types():
    assert isinstance(build_model(cfg("mf")), MatrixFactorization)
    assert isinstance(build_model(cfg("neumf")), NeuMF)
    assert isinstance(build_model(cfg("two_tower")), TwoTower)
    with pytest.raises(ValueError):
        build_model(cfg("nope"))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_shapes_any_batch(name, batch):
    model = build_model(cfg(name), seed=0)
    out = model(embeddings(batch, embedding_dim_for(cfg(name))), None)
    assert out.shape == (batch,) and out.dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_candidate_batches_match_per_sample_calls(name):
    """The [B*K, D] repeat-interleaved evaluation used by CEL reassignment equals K separate
    calls: no hidden batch-size assumption."""
    model = build_model(cfg(name), seed=0).eval()
    width = embedding_dim_for(cfg(name))
    embs = embeddings(6, width)
    rows = torch.randn(4, width)                                  # K = 4 candidate item rows
    expanded = {"user_id": embs["user_id"].repeat_interleave(4, dim=0),
                "item_id": rows.repeat(6, 1)}
    batched = model(expanded, None).view(6, 4)
    for k in range(4):
        single = model({"user_id": embs["user_id"], "item_id": rows[k].expand(6, -1)}, None)
        torch.testing.assert_close(batched[:, k], single)


def test_mf_matches_manual_formula():
    model = build_model(cfg("mf", d=8))
    model.set_global_bias(3.5)
    embs = embeddings(10, 9)
    u, i = embs["user_id"], embs["item_id"]
    expected = (u[:, :8] * i[:, :8]).sum(1) + u[:, 8] + i[:, 8] + 3.5
    torch.testing.assert_close(model(embs, None), expected)


@pytest.mark.parametrize("feature", ["user_id", "item_id"])
def test_mf_linear_form(feature):
    model = build_model(cfg("mf", d=8))
    model.set_global_bias(-1.25)
    embs = embeddings(10, 9)
    x, const = model.linear_form(embs, None, feature)
    torch.testing.assert_close((x * embs[feature]).sum(1) + const, model(embs, None))


@pytest.mark.parametrize("name", ["neumf", "two_tower"])
def test_set_global_bias_shifts_predictions(name):
    model = build_model(cfg(name), seed=0)
    embs = embeddings(7, embedding_dim_for(cfg(name)))
    before = model(embs, None)
    model.set_global_bias(model.output.bias.item() + 2.0 if name == "neumf" else 2.0)
    torch.testing.assert_close(model(embs, None), before + 2.0)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_both_embeddings_and_parameters(name):
    model = build_model(cfg(name), seed=0)
    embs = embeddings(16, embedding_dim_for(cfg(name)), requires_grad=True)
    model(embs, None).pow(2).sum().backward()
    for key, e in embs.items():
        assert e.grad is not None and e.grad.abs().sum() > 0, key
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", NAMES)
def test_dense_features(name):
    model = build_model(cfg(name), num_dense=3, seed=0)
    embs = embeddings(5, embedding_dim_for(cfg(name)), requires_grad=True)
    dense = torch.randn(5, 3, requires_grad=True)
    out = model(embs, dense)
    assert out.shape == (5,)
    out.sum().backward()
    assert dense.grad is not None and dense.grad.abs().sum() > 0
    # without num_dense the dense input is ignored
    plain = build_model(cfg(name), seed=0)
    torch.testing.assert_close(plain(embs, torch.randn(5, 3)), plain(embs, None))


@pytest.mark.parametrize("name", ["neumf", "two_tower", "mf"])
def test_overfits_tiny_problem(name):
    """64 ratings over 16 users x 16 items: learnable entity embeddings + the model, Adam."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    users = torch.randint(0, 16, (64,), generator=g)
    items = torch.randint(0, 16, (64,), generator=g)
    labels = torch.randint(1, 6, (64,), generator=g).float()
    c = cfg(name, d=16, hidden=(32, 16))
    width = embedding_dim_for(c)
    user_table = torch.nn.Parameter(0.1 * torch.randn(16, width, generator=g))
    item_table = torch.nn.Parameter(0.1 * torch.randn(16, width, generator=g))
    model = build_model(c, seed=0)
    model.set_global_bias(labels.mean().item())
    opt = torch.optim.Adam([user_table, item_table, *model.parameters()], lr=0.02)

    def loss_now():
        pred = model({"user_id": user_table[users], "item_id": item_table[items]}, None)
        return ((pred - labels) ** 2).mean()

    first = loss_now().item()
    for _ in range(300):
        opt.zero_grad()
        loss = loss_now()
        loss.backward()
        opt.step()
    last = loss_now().item()
    assert last < first / 10, (first, last)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_build_is_deterministic_and_leaves_global_rng(name):
    state = torch.get_rng_state()
    a = build_model(cfg(name, dropout=0.1), seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model(cfg(name, dropout=0.1), seed=7)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    torch.manual_seed(3)
    c = build_model(cfg(name))
    torch.manual_seed(3)
    d = build_model(cfg(name))
    for pc, pd in zip(c.parameters(), d.parameters()):
        assert torch.equal(pc, pd)
    embs = embeddings(9, embedding_dim_for(cfg(name)))
    torch.testing.assert_close(a.eval()(embs, None), b.eval()(embs, None))


@pytest.mark.parametrize("name", ["mf", "two_tower", "gmf"])
def test_score_matrix_equals_forward_on_every_pair(name):
    model = build_model(cfg(name), seed=0).eval()
    model.set_global_bias(0.75)
    width = embedding_dim_for(cfg(name))
    g = torch.Generator().manual_seed(1)
    users, items = torch.randn(5, width, generator=g), torch.randn(7, width, generator=g)
    pairs = {"user_id": users.repeat_interleave(7, dim=0), "item_id": items.repeat(5, 1)}
    with torch.no_grad():
        torch.testing.assert_close(model.score_matrix(users, items),
                                   model(pairs, None).view(5, 7))


@pytest.mark.parametrize("feature", ["user_id", "item_id"])
def test_gmf_is_a_dot_product_plus_bias_and_linear_in_each_row(feature):
    model = build_model(cfg("gmf", d=8))
    model.set_global_bias(-0.5)
    embs = embeddings(10, 8)
    expected = (embs["user_id"] * embs["item_id"]).sum(1) - 0.5
    torch.testing.assert_close(model(embs, None), expected)
    x, const = model.linear_form(embs, None, feature)
    torch.testing.assert_close((x * embs[feature]).sum(1) + const, expected)
    assert embedding_dim_for(cfg("gmf", d=8)) == 8
    with pytest.raises(ValueError, match="multiple of 4"):
        embedding_dim_for(cfg("gmf", d=6))
