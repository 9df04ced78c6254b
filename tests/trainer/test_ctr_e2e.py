"""A CTR run end to end: a Criteo-like synthetic dataset (dense + several categorical features),
DLRM and DeepFM over every categorical feature, CEL at a byte budget against the full model."""
import json
import math

import pytest

from data_pipeline.synthetic_ctr import generate_synthetic_ctr
from tests.trainer.test_train_e2e import ROOT
from trainer.config import load_config
from trainer.worker import run_worker


@pytest.fixture(scope="module")
def ctr_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctr") / "data"
    generate_synthetic_ctr(out, rows=6000, vocab_max=600, vocab_min=5, categorical=5, dense=3,
                           clusters=4, seed=0)
    return out


def ctr_config(tmp_path, data, name, *extra):
    return load_config(str(ROOT / "configs/synthetic_small.yaml"), [
        "data.kind=path", f"data.path={data}", "data.batch_size=512", "train.loss=bce",
        "model.embedding_dim=8", "model.hidden=[16]", "model.dense_hidden=[8]",
        "embedding.min_cardinality=50", "cel.reassign_mode=lite", "cel.reassign_per_epoch=1",
        "train.epochs=2", "tracking.loggers=[jsonl]", f"run.dir={tmp_path}", f"run.name={name}",
        *extra])


@pytest.mark.parametrize("model", ["dlrm", "deepfm"])
def test_ctr_model_trains_on_every_feature_with_cel_at_a_budget(tmp_path, ctr_data, model):
    full = run_worker(ctr_config(tmp_path, ctr_data, "full", f"model.name={model}",
                                 "embedding.method=full"))
    cel = run_worker(ctr_config(tmp_path, ctr_data, "cel", f"model.name={model}",
                                "embedding.method=cel", "embedding.compression=4"))
    meta = json.loads((ctr_data / "meta.json").read_text())
    large = [t for t, n in [("users", meta["num_users"]), ("items", meta["num_items"]),
                            *meta["sparse_features"].items()] if n >= 50]
    assert len(large) >= 2
    for m in (full, cel):
        assert 0.5 < m["val_auc"] <= 1.0 and math.isfinite(m["val_ne"]) and m["val_ne"] < 1.05
    # every large table is clustered and grew clusters; the bytes shrank about 4x
    for t in large:
        assert cel[f"num_clusters_{t}"] > 1, t
    assert 2.5 < full["embedding_bytes"] / cel["embedding_bytes"] < 5
    assert cel["val_auc"] > 0.55


def test_linearised_lite_reassigns_every_large_table_in_one_shared_pass(tmp_path, ctr_data):
    """`cel.lite_scoring=linearised` under DLRM: each reassignment event holds one record per
    clustered table, all at the same step, scored linearised; the run still learns."""
    cel = run_worker(ctr_config(tmp_path, ctr_data, "lin", "model.name=dlrm",
                                "embedding.method=cel", "embedding.compression=4",
                                "cel.lite_scoring=linearised"))
    events = [json.loads(line) for line in (tmp_path / "lin" / "phases.jsonl").read_text().splitlines()]
    reassigns = [e for e in events if e["kind"] == "reassign"]
    clustered = [k for k in cel if k.startswith("num_clusters_")]      # users, items, sparse_*
    assert len(clustered) >= 3
    assert reassigns and {e["lite_scoring"] for e in reassigns} == {"linearised"}
    for step in {e["step"] for e in reassigns}:
        assert len({e["table"] for e in reassigns if e["step"] == step}) == len(clustered)
    assert sum(e["moved"] for e in reassigns) > 0
    assert cel["val_auc"] > 0.55


def test_the_embedded_ctr_default_builds_its_data_once_and_trains_dlrm_over_every_feature(tmp_path):
    """configs/ctr_small.yaml (`data.kind: synthetic_ctr`), shrunk: the Criteo-like dataset is
    generated on first use under data.cache_dir, reused by the next run, and DLRM trains with
    CEL on every large table."""
    def run(name):
        return run_worker(load_config(str(ROOT / "configs/ctr_small.yaml"), [
            f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic_ctr.rows=6000",
            "data.synthetic_ctr.vocab_max=600", "data.synthetic_ctr.categorical=5",
            "data.synthetic_ctr.dense=3", "data.batch_size=512", "embedding.min_cardinality=50",
            "embedding.compression=4", "tracking.loggers=[jsonl]", f"run.dir={tmp_path}",
            f"run.name={name}"]))
    first = run("a")
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].name.startswith("synth-ctr-")
    meta = json.loads((built[0] / "meta.json").read_text())
    assert len(meta["sparse_features"]) == 3 and len(meta["dense_features"]) == 3
    assert meta["extra"]["synthetic_ctr"]["rows"] == 6000
    second = run("b")
    assert list((tmp_path / "cache").iterdir()) == built            # reused, not rebuilt
    assert first["val_auc"] == second["val_auc"] > 0.5
    assert first["model"] == "dlrm" and first["method"] == "cel"
    assert sum(k.startswith("num_clusters_sparse_") for k in first) >= 1


def test_a_bad_synthetic_ctr_parameter_fails_with_its_name(tmp_path):
    from data_pipeline.errors import DataError
    cfg = load_config(str(ROOT / "configs/ctr_small.yaml"), [
        f"data.cache_dir={tmp_path}", "data.synthetic_ctr.categorical=1",
        "tracking.loggers=[jsonl]", f"run.dir={tmp_path}"])
    with pytest.raises(DataError, match="categorical must be >= 2"):
        run_worker(cfg)
