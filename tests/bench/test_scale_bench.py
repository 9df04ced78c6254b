"""The scale benchmark runs end to end at a toy size: real trainer subprocesses (one, and two
under torchrun) on planted data,
one record per run with the figures the README's scale table shows."""
import json

import bench.common
from bench import scale_bench


def test_scale_bench_runs_and_records_each_method(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path / "results")
    scale_bench.main(["--sizes", "600", "--epochs", "1", "--planted", "4", "--batch", "512",
                      "--methods", "oracle,cel", "--exact-max-cells", "0", "--procs", "1", "2",
                      "--cache", str(tmp_path / "cache"), "--name", "scale_test"])
    data = json.loads((tmp_path / "results" / "scale_test.json").read_text())
    reference, *recs = data["records"]
    # what the data identifies: the planted-row MAP assignment's purity and ARI, beside the runs
    assert reference["method"] == "planted_map" and reference["item_clusters"] == 4
    for key in ("purity_items", "purity_users", "ari_items", "ari_users"):
        assert 0 < reference[key] <= 1
    assert reference["map_accuracy_users"] <= reference["purity_users"]
    assert [(r["method"], r["reassign_mode"], r["item_clusters"], r["processes"]) for r in recs] == [
        ("oracle", None, 4, 1), ("cel", "lite", 16, 1), ("cel", "lite", 4, 1),
        ("cel", "lite", 16, 2)]
    oracle, cel16, cel4, cel16_2 = recs
    assert oracle["purity_items"] == 1.0 and oracle["ari_items"] == 1.0
    assert oracle["split_s"] == 0 and oracle["reassign_s"] == 0
    for r in (cel16, cel4, cel16_2):
        assert 0 < r["purity_items"] <= 1 and r["val_rmse"] > 0 and r["samples_per_s"] > 0
        assert 0 <= r["phase_share"] < 1 and r["peak_rss_bytes"] > 0
        assert r["embedding_state_bytes"] > r["embedding_bytes"] > 0
    assert cel16["num_clusters_items"] > cel4["num_clusters_items"] >= 2
