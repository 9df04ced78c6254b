"""The full-table peers a user would pick for rating prediction, on the same split as ours: the
Surprise library's SVD (a grid chosen on validation), SVD++ and item-based KNNBaseline, trained on
the prepared dataset's train split and scored on its validation split (MovieLens-100K: the CEL
reference split), beside the CEL and full MF records of bench/results/quality_ml100k.json.

    python -m bench.surprise_peers [--data data/ml100k] [--src ../shared/datasets/ml-100k] [--quick]

Surprise (`scikit-surprise`, the `bench` extra) is a benchmark-only dependency: nothing outside
bench/ imports it. Its models hold float64 factors; `item_side_bytes` counts them as float32
(item factors + the item bias), as our tables store them, so bytes compare like for like.
Writes bench/results/surprise_peers.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import time

import numpy as np

from bench.common import RESULTS_DIR, print_table, write_results
from bench.quality_ml100k import ensure_data

ROOT = pathlib.Path(__file__).resolve().parent.parent
# 36 points: factors x epochs x lr x reg
SVD_GRID = {"n_factors": [50, 100, 200], "n_epochs": [20, 50, 100], "lr_all": [0.005, 0.01],
            "reg_all": [0.05, 0.1]}
QUICK_GRID = {"n_factors": [50], "n_epochs": [20], "lr_all": [0.005], "reg_all": [0.05, 0.1]}


def load_split(data: pathlib.Path, split: str) -> np.ndarray:
    """`[n, 3]` (user, item, rating) of a prepared split, dense ids."""
    import pyarrow.dataset as ds
    t = ds.dataset(str(data / split), format="parquet").to_table(
        columns=["user_id", "item_id", "label"])
    return np.stack([t.column(c).to_numpy().astype(np.float64)
                     for c in ("user_id", "item_id", "label")], axis=1)


def surprise_trainset(train: np.ndarray, rating_scale: tuple[float, float]):
    """A Surprise Trainset of (user, item, rating) rows (ids as ints)."""
    import pandas as pd
    from surprise import Dataset, Reader
    frame = pd.DataFrame({"u": train[:, 0].astype(np.int64), "i": train[:, 1].astype(np.int64),
                          "r": train[:, 2]})
    return Dataset.load_from_df(frame, Reader(rating_scale=rating_scale)).build_full_trainset()


def rmse_on(algo, rows: np.ndarray) -> float:
    """RMSE of a fitted Surprise model on (user, item, rating) rows (ids unseen in training get
    Surprise's fallback, the global mean plus whatever bias is known)."""
    pred = np.array([algo.predict(int(u), int(i)).est for u, i, _ in rows])
    return float(np.sqrt(np.mean((pred - rows[:, 2]) ** 2)))


def item_side_bytes(algo, num_items: int) -> int | None:
    """float32 bytes of the item side: factors (qi; SVD++ adds yj), the item bias and, for
    item-based KNN, the item x item similarity matrix it scores with."""
    per_item = 0
    sim = getattr(algo, "sim", None)
    extra = int(sim.size) * 4 if sim is not None and getattr(algo, "sim_options", {}).get(
        "user_based", True) is False else 0
    for name in ("qi", "yj"):
        if getattr(algo, name, None) is not None:
            per_item += getattr(algo, name).shape[1]
    if hasattr(algo, "bi"):
        per_item += 1
    return per_item * 4 * num_items + extra if per_item or extra else None


def run(data: pathlib.Path, quick: bool) -> list[dict]:
    from surprise import SVD, KNNBaseline, SVDpp
    train, val = load_split(data, "train"), load_split(data, "val")
    meta = json.loads((data / "meta.json").read_text())
    scale = (float(train[:, 2].min()), float(train[:, 2].max()))
    trainset = surprise_trainset(train, scale)
    records = []
    grid = QUICK_GRID if quick else SVD_GRID
    keys = list(grid)
    best = None
    for point in itertools.product(*grid.values()):
        params = dict(zip(keys, point))
        t0 = time.perf_counter()
        algo = SVD(random_state=0, **params).fit(trainset)
        rmse = rmse_on(algo, val)
        print(f"[surprise] SVD {params}: val RMSE {rmse:.4f} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
        if best is None or rmse < best[0]:
            best = (rmse, params, algo, time.perf_counter() - t0)
    records.append({"method": "surprise-svd", "params": best[1], "val_rmse": best[0],
                    "selection": f"best of {len(list(itertools.product(*grid.values())))} grid "
                                 f"points on validation",
                    "item_side_bytes": item_side_bytes(best[2], meta["num_items"]),
                    "train_time_s": best[3]})
    peers = [("surprise-svdpp", SVDpp(random_state=0), "Surprise defaults"),
             ("surprise-knnbaseline-item",
              KNNBaseline(sim_options={"name": "pearson_baseline", "user_based": False},
                          verbose=False), "item-based, pearson_baseline similarity")]
    for name, algo, params in (peers[:1] if quick else peers):
        t0 = time.perf_counter()
        algo.fit(trainset)
        rmse = rmse_on(algo, val)
        seconds = time.perf_counter() - t0
        print(f"[surprise] {name}: val RMSE {rmse:.4f} ({seconds:.1f} s)", flush=True)
        records.append({"method": name, "params": params, "val_rmse": rmse,
                        "item_side_bytes": item_side_bytes(algo, meta["num_items"]),
                        "train_time_s": seconds})
    return records


def ours(path: pathlib.Path) -> list[dict]:
    """The MF records of quality_ml100k.json to set beside the peers (CEL-50 and full)."""
    if not path.exists():
        return []
    out = []
    for r in json.loads(path.read_text())["records"]:
        if r.get("model") == "mf" and (r["method"] == "full" or
                                        (r["method"] == "cel" and r.get("item_clusters") == 50
                                         and not r.get("user_clusters"))):
            out.append({"method": f"ours: {r['method']}" + ("@50" if r["method"] == "cel" else ""),
                        "params": r.get("overrides", ""), "val_rmse": r["best_val_rmse"],
                        "item_side_bytes": r.get("item_side_bytes"),
                        "train_time_s": r.get("time_to_best_s"),
                        "selection": "best epoch on validation (bench.quality_ml100k)"})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.surprise_peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data/ml100k"))
    parser.add_argument("--src", default=str(ROOT.parent / "shared/datasets/ml-100k"))
    parser.add_argument("--quick", action="store_true", help="2 SVD points and SVD++ only")
    parser.add_argument("--results", default=str(RESULTS_DIR), help="where the JSON goes")
    parser.add_argument("--quality", default=str(RESULTS_DIR / "quality_ml100k.json"),
                        help="our records to compare with")
    args = parser.parse_args(argv)
    data = pathlib.Path(args.data)
    ensure_data(data, pathlib.Path(args.src))
    records = run(data, args.quick) + ours(pathlib.Path(args.quality))
    print_table(records, ["method", "val_rmse", "item_side_bytes", "train_time_s", "params"])
    write_results("surprise_peers", records, directory=pathlib.Path(args.results),
                  data=str(data), quick=args.quick,
                  note="val RMSE on the prepared dataset's validation split; Surprise factors "
                       "counted as float32")
    return records


if __name__ == "__main__":
    main()
