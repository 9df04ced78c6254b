"""The serving export: a trained run -> `trainer.export` -> `trainer.serving` / `trainer.predict` /
`trainer.recommend`, whose scores equal the trained model's, for every embedding method, torch
and DCP-sharded tables, one process and two."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from tests.trainer.test_train_e2e import TINY, tiny_config
from trainer import predict, recommend
from trainer.dist import init_distributed
from trainer.export import export_run, main as export_main, new_entity_cluster
from trainer.loop import TrainRecipe
from trainer.metrics import regression_metrics
from trainer.serving import ServingModel

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHORT = ["train.epochs=1", "train.max_steps=15"]


def _trained(tmp_path, *extra):
    recipe = TrainRecipe(tiny_config(tmp_path, *SHORT, *extra), init_distributed())
    recipe.setup()
    recipe.train()
    return recipe


def _val(recipe):
    """The validation split's dense ids, labels and the trained model's predictions."""
    recipe.emb.eval(), recipe.model.eval()
    users, items, labels, preds = [], [], [], []
    with torch.no_grad():
        for kjt, dense, label in recipe.val_source.epoch(0):
            preds.append(recipe.interaction_model(recipe.emb(kjt).to_dict(), dense))
            users.append(kjt["user_id"].values()), items.append(kjt["item_id"].values())
            labels.append(label)
    return (torch.cat(users).numpy(), torch.cat(items).numpy(), torch.cat(labels).numpy(),
            torch.cat(preds).numpy())


def _raw(model: ServingModel, feature: str, dense_ids: np.ndarray) -> list[str]:
    return model.vocabulary(feature).take(pa.array(dense_ids)).to_pylist()


@pytest.mark.parametrize("extra, kinds, tables", [
    ([], {"user_id": "clustered", "item_id": "clustered"}, "sharded"),
    (["train.optimizer=adam", "cel.items.entity_bias=true"],
     {"user_id": "clustered", "item_id": "clustered"}, "torch"),
    (["embedding.method=full"], {"user_id": "full", "item_id": "full"}, "sharded"),
    (["embedding.method=hash", "embedding.compression=4", "embedding.min_cardinality=100"],
     {"user_id": "hash", "item_id": "hash"}, "sharded"),
    (["embedding.method=qr", "embedding.compression=4", "embedding.min_cardinality=100",
      "train.optimizer=adam"], {"user_id": "qr", "item_id": "qr"}, "torch"),
    (["embedding.method=sparse", "embedding.compression=4", "embedding.min_cardinality=250"],
     {"user_id": "sparse", "item_id": "full"}, "sharded"),
    (["embedding.method=cce", "embedding.compression=4", "embedding.min_cardinality=100",
      "embedding.cce_until=1.0"], {"user_id": "cce", "item_id": "cce"}, "torch"),
    (["embedding.method=cerp", "embedding.compression=8", "embedding.min_cardinality=100"],
     {"user_id": "cerp", "item_id": "cerp"}, "torch"),
    (["cel.items.map_dtype=auto", "cel.users.map_dtype=auto"],
     {"user_id": "clustered", "item_id": "clustered"}, "sharded"),
], ids=["cel-dcp", "cel-bias-torch", "full", "hash", "qr", "sparse", "cce", "cerp",
        "cel-narrow-maps-dcp"])
def test_export_scores_equal_the_trained_models(tmp_path, extra, kinds, tables):
    recipe = _trained(tmp_path, *extra)
    assert recipe._tables_tag() == tables
    users, items, labels, expected = _val(recipe)
    states = getattr(recipe.emb, "cluster_states", None)
    map_dtypes = {t: str(states[t].assignment.dtype).removeprefix("torch.")
                  for t in (recipe.emb.clustered_tables if states is not None else [])}
    narrow = any("map_dtype=auto" in e for e in extra)
    if map_dtypes:      # the maps are stored as configured, and counted so
        assert set(map_dtypes.values()) == ({"int8"} if narrow else {"int32"}), map_dtypes
    manifest = export_run(recipe.run_dir, tmp_path / "export")
    recipe.cleanup()
    assert {f: s["kind"] for f, s in manifest["features"].items()} == kinds
    if any(k in ("sparse", "cce", "cerp") for k in kinds.values()):
        # the bytes the run reports are the bytes its export stores (indices, maps, row pointers)
        assert manifest["embedding_bytes"] == recipe.embedding_bytes
    assert manifest["training_commit"] == recipe.commit and manifest["step"] == recipe.step
    files = manifest["files"]
    for f, spec in manifest["features"].items():      # shapes and bytes as written
        for name, rel in spec["files"].items():
            arr = np.load(tmp_path / "export" / rel)
            assert list(arr.shape) == files[rel]["shape"] and arr.nbytes == files[rel]["bytes"]
        if spec["kind"] == "clustered":
            assert files[spec["files"]["assignment"]]["dtype"] == ("int8" if narrow else "int32")
            assert files[spec["files"]["clusters"]]["shape"][0] == spec["num_clusters"]
    served = ServingModel(tmp_path / "export")
    # through raw ids and the vocabularies, as a user calls it
    got = served.predict({"user_id": _raw(served, "user_id", users),
                          "item_id": _raw(served, "item_id", items)})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert regression_metrics(got, labels)["rmse"] == pytest.approx(
        regression_metrics(expected, labels)["rmse"], abs=1e-6)


def test_unknown_raw_ids_get_the_new_entity_row_never_an_error(tmp_path):
    recipe = _trained(tmp_path, "train.optimizer=adam", "cel.items.entity_bias=true")
    export_run(recipe.run_dir, tmp_path / "export")
    recipe.cleanup()
    served = ServingModel(tmp_path / "export")
    spec = served.features["item_id"]
    assert served.dense_ids("item_id", ["no-such-item", "0"]).tolist()[0] == -1
    got = served.predict({"user_id": ["0", "0"], "item_id": ["no-such-item", "0"]})
    assert np.isfinite(got).all()
    # the unknown item scores as a member of the new-entity cluster with a zero entity bias
    c = spec["new_entity_cluster"]
    row = served.arrays["item_id"]["clusters"][c]
    user = served.embed("user_id", served.dense_ids("user_id", ["0"]))
    want = served.model({"user_id": user, "item_id": row[None]}).item()
    assert got[0] == pytest.approx(want, abs=1e-6)
    items, scores = served.recommend(["never-seen-user"], k=5)
    assert len(items[0]) == 5 and np.isfinite(scores).all()


def test_new_entity_cluster_follows_the_unseen_policy():
    assignment = np.array([0, 0, 1, 2, 2, 2], dtype=np.int32)
    counts = np.array([9, 9, 0, 1, 1, 1])
    # pooled / largest moved the cold ones (count < 1: entity 2) to cluster 1
    assert new_entity_cluster(assignment, counts, 3, "pooled", 1)[0] == 1
    # stay: the cluster with the most training interactions (0: 18, 1: 0, 2: 3)
    assert new_entity_cluster(assignment, counts, 3, "stay", 1)[0] == 0
    assert new_entity_cluster(assignment, counts, 3, "largest", 2)[0] == 2   # 3 cold in 2


def test_recommend_and_predict_cli_batch_modes(tmp_path, capsys):
    recipe = _trained(tmp_path, "train.optimizer=adam", "cel.items.entity_bias=true")
    run_dir, data_dir = recipe.run_dir, recipe.data_dir
    recipe.cleanup()
    out = tmp_path / "export"
    export_main(["--run", str(run_dir), "--out", str(out)])
    assert "[export]" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        export_run(run_dir, out)
    served = ServingModel(out)
    train = ds.dataset(str(data_dir / "train"), format="parquet").to_table()
    busiest = int(np.bincount(train.column("user_id").to_numpy()).argmax())
    raw_user = _raw(served, "user_id", np.array([busiest]))[0]
    (tmp_path / "users.csv").write_text(f"user_id\n{raw_user}\n1\nghost\n")
    table = recommend.main(["--export", str(out), "--users", str(tmp_path / "users.csv"),
                            "--k", "7", "--exclude-train", "--out", str(tmp_path / "top.csv")])
    assert table.num_rows == 21 and (tmp_path / "top.csv").exists()
    rows = table.to_pylist()
    assert [r["rank"] for r in rows[:7]] == list(range(1, 8))
    first = [r for r in rows if r["user_id"] == raw_user]
    scores = [r["score"] for r in first]
    assert scores == sorted(scores, reverse=True)
    # no training item of the user is recommended; the scores are the model's own
    seen = set(train.filter(pa.compute.equal(train.column("user_id"), busiest))
               .column("item_id").to_pylist())
    top_dense = served.dense_ids("item_id", [r["item_id"] for r in first])
    assert not seen & set(top_dense.tolist())
    direct = served.predict({"user_id": [raw_user] * 7, "item_id": [r["item_id"] for r in first]})
    np.testing.assert_allclose(direct, scores, atol=1e-5)
    # and they are the best of the unseen items
    everything = np.setdiff1d(np.arange(served.features["item_id"]["num_entities"]), list(seen))
    all_scores = served.predict({"user_id": [raw_user] * everything.size,
                                 "item_id": _raw(served, "item_id", everything)})
    assert scores[0] == pytest.approx(all_scores.max(), abs=1e-5)
    assert scores[-1] == pytest.approx(np.sort(all_scores)[-7], abs=1e-5)
    # predict over a Parquet of pairs
    pq.write_table(pa.table({"user_id": [raw_user, "ghost"], "item_id": ["3", "4"]}),
                   tmp_path / "pairs.parquet")
    scored = predict.main(["--export", str(out), "--pairs", str(tmp_path / "pairs.parquet"),
                           "--out", str(tmp_path / "scores.parquet")])
    assert pq.read_table(tmp_path / "scores.parquet").column_names == ["user_id", "item_id", "score"]
    assert np.isfinite(scored.column("score").to_numpy()).all()


def test_cli_errors_exit_2(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "trainer.export", "--run", str(tmp_path),
                              "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr
    bad = subprocess.run([sys.executable, "-m", "trainer.recommend", "--export", str(tmp_path),
                          "--user", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a serving export" in bad.stderr


@pytest.mark.dist
@pytest.mark.parametrize("maps", ["int32", "auto"])
def test_export_of_a_two_process_sharded_run_reproduces_its_validation_rmse(tmp_path, maps):
    torchrun = pathlib.Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "trainer.main", "--config",
           str(ROOT / "configs/synthetic_small.yaml"), *TINY, "train.max_steps=12",
           f"cel.items.map_dtype={maps}", f"cel.users.map_dtype={maps}",
           "dist.sharding=row_wise", f"run.dir={tmp_path / 'runs'}",
           f"data.cache_dir={tmp_path / 'cache'}", "run.name=tr"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tr"
    manifest = export_run(run_dir, tmp_path / "export")
    assert manifest["world_size"] == 2
    dtypes = {manifest["files"][spec["files"]["assignment"]]["dtype"]
              for spec in manifest["features"].values()}
    assert dtypes == ({"int8"} if maps == "auto" else {"int32"})
    kinds = [json.loads(line)["kind"] for line in (run_dir / "phases.jsonl").read_text().splitlines()]
    assert "reassign" in kinds and "split" in kinds, kinds      # both collectives ran on the maps
    served = ServingModel(tmp_path / "export")
    val = ds.dataset(str(pathlib.Path(manifest["data_dir"]) / "val"), format="parquet").to_table()
    got = served.predict({"user_id": _raw(served, "user_id", val.column("user_id").to_numpy()),
                          "item_id": _raw(served, "item_id", val.column("item_id").to_numpy())})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rmse = regression_metrics(got, val.column("label").to_numpy())["rmse"]
    assert rmse == pytest.approx(metrics["val_rmse"], abs=1e-5)


def test_export_of_a_ctr_model_scores_every_feature_and_the_dense_columns(tmp_path):
    from data_pipeline.synthetic_ctr import generate_synthetic_ctr
    from tests.trainer.test_ctr_e2e import ctr_config
    from trainer.metrics import auc_score
    from trainer.worker import run_worker
    data = tmp_path / "data"
    generate_synthetic_ctr(data, rows=4000, vocab_max=400, vocab_min=5, categorical=3, dense=2,
                           clusters=4, seed=0)
    metrics = run_worker(ctr_config(tmp_path, data, "ctr", "model.name=deepfm",
                                    "embedding.compression=4", "train.epochs=1"))
    manifest = export_run(tmp_path / "ctr", tmp_path / "export")
    assert len(manifest["features"]) == 3 and len(manifest["dense_features"]) == 2
    assert "clustered" in {s["kind"] for s in manifest["features"].values()}
    served = ServingModel(tmp_path / "export")
    val = ds.dataset(str(data / "val"), format="parquet").to_table()
    columns = {f: _raw(served, f, val.column(f).to_numpy()) for f in served.features}
    columns.update({c: val.column(c).to_numpy() for c in served.dense_features})
    prob = served.predict(columns)
    assert ((prob > 0) & (prob < 1)).all()
    auc = auc_score(prob, val.column("label").to_numpy())
    assert auc == pytest.approx(metrics["val_auc"], abs=1e-6)
    with pytest.raises(ValueError, match="recommend scores users against items"):
        served.recommend(["0"])
