"""The co-clustering probe behind the README's diagnosis: on sparse planted data the argmin
rule walks away from the planted assignment; a large enough gate keeps it."""
from bench.planted_probe import cosim
from data_pipeline.synthetic import generate_synthetic


def test_cosim_gate_keeps_the_planted_assignment_that_argmin_leaves(tmp_path):
    generate_synthetic(tmp_path / "s", users=400, items=400, interactions=6000, clusters=6, seed=3)
    argmin = cosim(tmp_path / "s", "planted", gate=0.0, rounds=5)
    frozen = cosim(tmp_path / "s", "planted", gate=1e9, rounds=5)      # nothing may move
    assert frozen["purity_users"] == frozen["purity_items"] == 1.0
    assert argmin["purity_users"] < 0.95 and argmin["purity_items"] < 0.95
    assert argmin["val_rmse"] > frozen["val_rmse"]
    random = cosim(tmp_path / "s", "random", gate=0.0, rounds=5)
    assert 0 < random["purity_items"] < 1 and random["val_rmse"] > 0


def test_cosim_topdown_doubles_to_the_budget(tmp_path):
    generate_synthetic(tmp_path / "s", users=300, items=300, interactions=6000, clusters=4, seed=1)
    out = cosim(tmp_path / "s", "topdown", gate=0.0, rounds=2, clusters=8)
    assert out["clusters"] == 8 and 0 < out["purity_users"] <= 1 and out["val_rmse"] > 0
