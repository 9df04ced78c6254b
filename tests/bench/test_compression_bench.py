"""bench.compression_bench on a tiny generated MovieLens u.data (planted user/item factors): the
protocol's dataset prepared, every method at its measured compression, AUCs real, the seed
spread recorded, the results file printed by bench.report and plotted by bench.plots."""
import json
import pathlib

import numpy as np
import pytest

from bench import compression_bench, plots, report


def write_planted_udata(path: pathlib.Path, users: int = 400, items: int = 300, per_user: int = 20,
                        seed: int = 0) -> None:
    """u.data whose ratings 1..5 are quintiles of a planted rank-4 score plus noise."""
    rng = np.random.default_rng(seed)
    u_f, i_f = rng.normal(size=(users, 4)), rng.normal(size=(items, 4))
    user = np.repeat(np.arange(users), per_user)
    item = np.concatenate([rng.choice(items, per_user, replace=False) for _ in range(users)])
    score = (u_f[user] * i_f[item]).sum(1) + 0.5 * rng.normal(size=len(user))
    rating = 1 + np.searchsorted(np.quantile(score, [0.2, 0.4, 0.6, 0.8]), score)
    ts = 880_000_000 + rng.permutation(len(user))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{u + 1}\t{i + 1}\t{r}\t{t}\n" for u, i, r, t in zip(user, item, rating, ts)))


def test_plan_leaves_out_what_a_method_cannot_reach():
    configs, left_out = compression_bench.plan(["full", "cel", "hash", "qr"], ["4x", "64x", "2000"],
                                               943, 1682)
    got = {(c["method"], c["budget"]) for c in configs}
    assert got == {("full", "full"), ("cel", "4x"), ("hash", "4x"), ("hash", "64x"), ("qr", "4x"),
                   ("qr", "64x")}
    reasons = {(lo["method"], lo["budget"]): lo["reason"] for lo in left_out}
    assert "int32 assignment map" in reasons[("cel", "64x")]        # the map alone is 1/32 at d=32
    assert "does not compress" in reasons[("hash", "2000")]          # 2 x 2,000 rows > 2,625
    narrow, _ = compression_bench.plan(["cel-narrow"], ["4x", "64x"], 943, 1682)
    assert [(c["budget"], c["overrides"]) for c in narrow] == [          # int8 maps reach 64x
        (b, ["embedding.method=cel", "cel.items.map_dtype=auto", f"embedding.compression={b[:-1]}"])
        for b in ("4x", "64x")]
    b = compression_bench.parse_budget("256", 6040, 3706)
    assert b["budget_rows_per_table"] == 256 and b["target_compression"] == pytest.approx(9746 / 512)
    assert compression_bench.default_budgets(943, 1682) == ["4x", "16x", "64x"]
    assert compression_bench.default_budgets(6040, 3706)[-3:] == ["256", "1024", "4096"]
    assert compression_bench.METHODS.split(",") == ["cel", "full", "hash", "qr", "cce", "cerp", "sparse"]
    from trainer.config import ConfigError
    with pytest.raises(ConfigError, match="embedding.method"):    # a method the trainer lacks
        compression_bench.plan(["full", "nope"], ["4x"], 943, 1682)


def test_compression_bench_quick_on_a_tiny_movielens_file(tmp_path, capsys):
    write_planted_udata(tmp_path / "ml" / "u.data")
    results = tmp_path / "results"
    records = compression_bench.main(
        ["--src", str(tmp_path / "ml"), "--data", str(tmp_path / "data"), "--quick", "--seeds", "2",
         "--epochs", "8", "--in-process", "--budgets", "8x", "--results", str(results)])
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["extra"]["drop_ratings"] == [3.0] and meta["split"] == {"method": "leave-last", "k": 2}
    assert meta["splits"]["val"] == 2 * meta["num_users"]
    by = {r["method"]: r for r in records}
    assert set(by) == set(compression_bench.METHODS.split(","))
    assert by["full"]["compression"] == 1.0 and by["full"]["budget"] == "full"
    assert by["full"]["embedding_bytes"] == (meta["num_users"] + meta["num_items"]) * 32 * 4
    for r in records:
        assert r["seeds"] == 2 and len(r["auc_seeds"]) == 2
        assert all(0 < a < 1 for a in r["auc_seeds"]), r
        assert r["auc_min"] <= r["auc"] <= r["auc_max"] and r["auc_std"] >= 0
        assert r["auc"] == pytest.approx(np.mean(r["auc_seeds"]), abs=1e-6)
        if r["method"] != "full":
            assert r["target_compression"] == 8.0
            assert r["compression"] == pytest.approx(8.0, rel=0.15), r
    assert by["cel"]["item_clusters"] > 1 and by["cel"]["user_clusters"] > 1
    assert by["full"]["auc"] > 0.55, by["full"]                # planted structure is learned
    written = json.loads((results / "compression.json").read_text())
    assert written["benchmark"] == "compression" and len(written["runs"]) == 2 * len(by)
    assert [r["method"] for r in written["records"]] == [r["method"] for r in records]
    assert written["records"][0]["dataset"] == "ml-cce"
    capsys.readouterr()
    report.main(["--results", str(results), "compression"])
    out = capsys.readouterr().out
    assert "### compression (commit" in out and "auc_std" in out and "| cel " in out
    pytest.importorskip("matplotlib")
    from matplotlib import image as mpimg
    written_plots = plots.quality_plots(results, tmp_path / "plots", ["compression"])
    assert [p.name for p in written_plots] == ["quality_vs_bytes_compression.png"]
    assert mpimg.imread(written_plots[0]).shape[0] > 200
