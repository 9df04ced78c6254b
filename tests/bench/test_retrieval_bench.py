"""bench.retrieval_bench on a tiny prepared dataset: every method at its bytes, ranking metrics in
range, the full table well above chance, the results file written."""
import json
import pathlib

from bench import retrieval_bench
from data_pipeline.synthetic import ensure_synthetic


def test_retrieval_bench_quick_on_a_tiny_dataset(tmp_path):
    data = pathlib.Path(ensure_synthetic(tmp_path / "cache", users=200, items=120, interactions=6000,
                                         clusters=4, seed=0, label="rating"))
    records = retrieval_bench.main(["--data", str(data), "--quick", "--results", str(tmp_path)])
    by = {r["method"]: r for r in records}
    assert set(by) == {"cel", "full", "hash", "qr"}
    assert by["full"]["item_side_bytes"] == 120 * 36 * 4                      # MF rows, d + 1 -> 36
    assert by["cel"]["item_side_bytes"] == 50 * 36 * 4 + 120 * 4 * 2           # rows + map + bias
    for r in records:
        for key in ("recall_at_10", "recall_at_20", "recall_at_50", "ndcg_at_20"):
            assert 0 <= r[key] <= 1, (r["method"], key, r[key])
        assert r["recall_at_10"] <= r["recall_at_50"] + 1e-9
    # 20 of 120 items at random: recall@20 about 0.17
    assert by["full"]["recall_at_20"] > 0.25, by["full"]
    assert by["full"]["vs_full_recall_at_20"] == 1.0
    written = json.loads((tmp_path / "retrieval.json").read_text())
    assert [r["method"] for r in written["records"]] == [r["method"] for r in records]
    assert written["records"][0]["dataset"] == f"{data.name}-implicit"
