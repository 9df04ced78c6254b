"""The sharded DLRM step benchmark runs end to end at a toy size: two gloo processes, full and
CEL tables under the trainer's compression rule, one record per method."""
import json

import bench.common
from bench import sharded_ctr_bench


def test_sharded_ctr_bench_times_full_and_cel_dlrm(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path / "results")
    sharded_ctr_bench.main(["--vocab-max", "4000", "--features", "5", "--min-cardinality", "800", "--batch", "64",
                            "--steps", "4", "--warmup", "1", "--compression", "4"])
    data = json.loads((tmp_path / "results" / "sharded_ctr.json").read_text())
    full, cel = data["records"]
    assert (full["method"], cel["method"]) == ("full", "cel")
    assert full["steps"] == cel["steps"] == 4 and full["world_size"] == 2
    # sizes 4000, 894, 200, 45, 10: the two >= 800 rows are clustered, to ~1/4 of their bytes
    assert cel["clustered_tables"] == 2
    big, small = (4000 + 894) * 16 * 4, (200 + 45 + 10) * 16 * 4
    assert full["embedding_bytes"] == big + small
    assert small + big / 4 * 0.9 <= cel["embedding_bytes"] <= small + big / 4
    assert cel["step_time_s"] > 0 and full["step_time_s"] > 0
    assert cel["vs_full"] == cel["step_time_s"] / full["step_time_s"]
