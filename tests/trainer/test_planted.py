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
from trainer.planted import load_planted_labels, planted_map_reference
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


def _brute_force_map(data_dir, min_interactions):
    """Per-entity loop: block means of the planted pairs, then each warm entity's argmin."""
    train = pq.read_table(data_dir / "train").to_pandas()
    pu, pi = load_planted(data_dir, "users"), load_planted(data_dir, "items")
    block = {}
    for (a, b), y in train.groupby([pu[train.user_id], pi[train.item_id]])["label"]:
        block[(a, b)] = y.mean()
    mean = train.label.mean()
    rows = np.array([[block.get((a, b), mean) for b in range(pi.max() + 1)]
                     for a in range(pu.max() + 1)])
    out = {}
    for key, col, other, truth, table in (("users", "user_id", "item_id", pu, rows),
                                          ("items", "item_id", "user_id", pi, rows.T)):
        other_cluster = pi if key == "users" else pu
        hits, warm = 0, 0
        for ent, grp in train.groupby(col):
            if len(grp) < min_interactions:
                continue
            c = other_cluster[grp[other].to_numpy()]
            y = grp.label.to_numpy()
            loss = [float(((y - table[k, c]) ** 2).sum()) for k in range(table.shape[0])]
            warm += 1
            hits += int(np.argmin(loss) == truth[ent])
        out[f"map_accuracy_{key}"] = hits / warm
    return out


def test_planted_map_reference_equals_a_per_entity_brute_force(tmp_path):
    generate_synthetic(tmp_path / "s", users=60, items=40, interactions=3000, clusters=3, seed=2,
                       score_noise=1.0)
    got = planted_map_reference(tmp_path / "s", min_interactions=5, entity_chunk=7)
    want = _brute_force_map(tmp_path / "s", 5)
    for key in ("users", "items"):
        assert got[f"map_accuracy_{key}"] == pytest.approx(want[f"map_accuracy_{key}"])
        assert 0.0 < got[f"map_accuracy_{key}"] < 1.0       # noisy enough to miss some
        assert got[f"map_purity_{key}"] >= got[f"map_accuracy_{key}"] - 1e-12


def test_planted_map_reference_falls_with_fewer_interactions_per_entity(tmp_path):
    common = dict(users=400, items=400, clusters=8, seed=0, user_alpha=0.0, item_alpha=0.0)
    generate_synthetic(tmp_path / "dense", interactions=80_000, **common)
    generate_synthetic(tmp_path / "sparse", interactions=4_000, **common)
    dense = planted_map_reference(tmp_path / "dense")
    sparse = planted_map_reference(tmp_path / "sparse")
    for key in ("users", "items"):
        assert dense[f"map_accuracy_{key}"] > 0.95          # ~160 ratings each (uniform popularity): identified
        assert sparse[f"map_accuracy_{key}"] < dense[f"map_accuracy_{key}"] - 0.1
        assert dense[f"map_ari_{key}"] > 0.9


def test_planted_map_reference_needs_planted_clusters(tmp_path):
    generate_synthetic(tmp_path / "s", users=50, items=30, interactions=500, clusters=3, seed=1)
    shutil.rmtree(tmp_path / "s" / "planted")
    with pytest.raises(ValueError, match="planted clusters"):
        planted_map_reference(tmp_path / "s")
