"""bench.surprise_peers: Surprise's SVD / SVD++ trained on a prepared dataset's train split and
scored on its validation split, beside our records."""
import json
import pathlib

import numpy as np

from bench import surprise_peers
from data_pipeline.synthetic import ensure_synthetic


def test_surprise_peers_fit_the_prepared_split_and_beat_the_mean(tmp_path):
    data = pathlib.Path(ensure_synthetic(tmp_path / "cache", users=200, items=100, interactions=6000,
                            clusters=4, seed=0, label="rating"))
    records = surprise_peers.main(["--data", str(data), "--quick", "--results", str(tmp_path)])
    train, val = surprise_peers.load_split(data, "train"), surprise_peers.load_split(data, "val")
    mean_rmse = float(np.sqrt(np.mean((val[:, 2] - train[:, 2].mean()) ** 2)))
    by = {r["method"]: r for r in records}
    assert by["surprise-svd"]["val_rmse"] < 0.95 * mean_rmse, (by["surprise-svd"], mean_rmse)
    assert by["surprise-svdpp"]["val_rmse"] < mean_rmse     # its defaults, on tiny data
    # SVD: 50 factors + a bias per item, counted as float32
    assert by["surprise-svd"]["item_side_bytes"] == 51 * 4 * 100
    assert {"ours: cel@50", "ours: full"} <= set(by)      # from bench/results/quality_ml100k.json
    written = json.loads((tmp_path / "surprise_peers.json").read_text())
    assert [r["method"] for r in written["records"]] == [r["method"] for r in records]
