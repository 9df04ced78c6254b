"""bench.elsa_bench on a tiny prepared dataset: every method at its bytes, ranking metrics in
range, the full table well above chance, the results file written."""
import json
import pathlib

from bench import elsa_bench
from data_pipeline.synthetic import ensure_synthetic


def test_elsa_bench_quick_on_a_tiny_dataset(tmp_path):
    data = pathlib.Path(ensure_synthetic(tmp_path / "cache", users=200, items=120, interactions=6000,
                                         clusters=4, seed=0, label="rating"))
    records = elsa_bench.main(["--data", str(data), "--quick", "--dim", "16",
                               "--results", str(tmp_path)])
    by = {r["method"]: r for r in records}
    assert set(by) == set(elsa_bench.available_methods()) and {"full", "cel"} <= set(by)
    assert by["full"]["item_side_bytes"] == 120 * 16 * 4 and by["full"]["compression"] == 1
    for method, r in by.items():         # the 120-item table is compressed too (about 10x)
        if method != "full":
            assert 5 < r["compression"] < 16, (method, r["compression"])
    # CEL at 10x, d = 16: (120 * 64 / 10 - 4 * 120) // 64 = 4 cluster rows
    assert by["cel"]["item_clusters"] == 4
    for r in records:
        for key in ("recall_at_10", "recall_at_20", "recall_at_50", "ndcg_at_20"):
            assert 0 <= r[key] <= 1, (r["method"], key, r[key])
        assert r["recall_at_10"] <= r["recall_at_50"] + 1e-9
    assert by["full"]["recall_at_20"] > 0.25, by["full"]       # chance is about 0.17
    written = json.loads((tmp_path / "elsa.json").read_text())
    assert [r["method"] for r in written["records"]] == [r["method"] for r in records]
    assert written["records"][0]["dataset"] == f"{data.name}-implicit"
