"""Planted clusters: the loader, the recovery metrics in metrics.json, and the oracle run that
starts from (and keeps) the planted assignment."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.dataset import load_planted
from data_pipeline.errors import DataError
from data_pipeline.synthetic import generate_synthetic
from tests.trainer.test_train_e2e import tiny_config
from trainer.dist import init_distributed
from trainer.loop import TrainRecipe
from trainer.planted import load_planted_labels
from trainer.worker import run_worker

ORACLE = ["cel.init_from_planted=true", "cel.reassign_rule=none", "cel.split_until=0"]


def test_load_planted_tiny_synthetic(tmp_path):
    generate_synthetic(tmp_path / "s", users=50, items=30, interactions=500, clusters=3, seed=1)
    users, items = load_planted(tmp_path / "s", "users"), load_planted(tmp_path / "s", "items")
    assert users.dtype == np.int64 and users.shape == (50,) and items.shape == (30,)
    assert set(users.tolist()) == set(items.tolist()) == {0, 1, 2}
    labels = load_planted_labels(tmp_path / "s")
    assert np.array_equal(labels["user"], users) and np.array_equal(labels["item"], items)
    # rows stored out of id order are put back in id order
    perm = np.random.default_rng(0).permutation(30)
    pq.write_table(pa.table({"id": perm, "cluster": items[perm]}),
                   tmp_path / "s" / "planted" / "items.parquet")
    assert np.array_equal(load_planted(tmp_path / "s", "items"), items)
    # a dataset without planted clusters (e.g. MovieLens)
    shutil.rmtree(tmp_path / "s" / "planted")
    assert load_planted(tmp_path / "s", "users", missing_ok=True) is None
    assert load_planted_labels(tmp_path / "s") is None
    with pytest.raises(DataError, match="planted"):
        load_planted(tmp_path / "s", "users")


def test_learned_run_reports_purity_and_ari(tmp_path):
    run_worker(tiny_config(tmp_path, "train.epochs=1"))
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    for side in ("items", "users"):
        assert 0.0 <= metrics[f"purity_{side}"] <= 1.0
        assert -1.0 <= metrics[f"ari_{side}"] <= 1.0


def test_oracle_keeps_the_planted_clusters(tmp_path):
    metrics = run_worker(tiny_config(tmp_path, "train.epochs=1", *ORACLE))
    on_disk = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    for side in ("items", "users"):
        assert on_disk[f"purity_{side}"] == 1.0 and on_disk[f"ari_{side}"] == 1.0
        assert on_disk[f"num_clusters_{side}"] == 4          # data.synthetic.clusters in TINY
    assert metrics["val_rmse"] < 1.2
    assert not (tmp_path / "runs" / "tiny" / "phases.jsonl").exists()   # nothing split or moved


def test_oracle_needs_planted_labels_and_enough_capacity(tmp_path):
    recipe = TrainRecipe(tiny_config(tmp_path, *ORACLE, "cel.users.max_clusters=3"),
                         init_distributed())
    with pytest.raises(ValueError, match="4 planted user clusters exceed cel.users.max_clusters=3"):
        recipe.setup()
    data_dir = recipe.data_dir
    plain = tmp_path / "plain"
    shutil.copytree(data_dir, plain)
    shutil.rmtree(plain / "planted")
    recipe = TrainRecipe(tiny_config(tmp_path, *ORACLE, "data.kind=path", f"data.path={plain}"),
                         init_distributed())
    with pytest.raises(ValueError, match="no planted clusters"):
        recipe.setup()
    recipe = TrainRecipe(tiny_config(tmp_path, *ORACLE, "embedding.method=full"), init_distributed())
    with pytest.raises(ValueError, match="needs embedding.method=cel"):
        recipe.setup()
