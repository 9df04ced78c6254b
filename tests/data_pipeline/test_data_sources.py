"""Sources -> Parquet: MovieLens formats, the reference split, other splits, CSV, Criteo."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline import splits
from data_pipeline.dataset import load_meta, load_train_counts, load_vocab
from data_pipeline.sources.criteo import prepare_criteo
from data_pipeline.sources.csv import prepare_csv
from data_pipeline.sources.movielens import prepare_movielens
from dp_inputs import write_criteo, write_udata


def read(out, split):
    return pq.read_table(out / split).to_pydict()


def test_reference_split_sizes_and_permutation():
    rows = splits.reference_split(99_999, seed=0)
    assert (len(rows["train"]), len(rows["val"])) == (80_000, 19_999)
    perm = np.random.RandomState(seed=0).permutation(99_999)
    assert np.array_equal(np.concatenate([rows["train"], rows["val"]]), perm)


def test_movielens_u_data_reference_split(tmp_path):
    raw = write_udata(tmp_path / "ml" / "u.data", n=999)
    meta = prepare_movielens(tmp_path / "ml", tmp_path / "out")
    assert meta.splits == {"train": int(0.8 * 999) + 1, "val": 999 - int(0.8 * 999) - 1}
    assert meta.split == {"method": "reference", "seed": 0}
    perm = np.random.RandomState(0).permutation(999)
    train = read(tmp_path / "out", "train")
    users = load_vocab(tmp_path / "out", "users").column("raw_id").to_pylist()
    items = load_vocab(tmp_path / "out", "items").column("raw_id").to_pylist()
    for position in (0, 1, meta.splits["train"] - 1):          # train is in permutation order
        u, i, r, t = raw[perm[position]]
        assert (users[train["user_id"][position]], items[train["item_id"][position]]) == (str(u), str(i))
        assert (train["label"][position], train["timestamp"][position]) == (r, t)
    val = read(tmp_path / "out", "val")
    assert val["timestamp"][0] == raw[perm[meta.splits["train"]]][3]
    assert meta.num_users == len(np.unique(raw[:, 0])) and meta.num_items == len(np.unique(raw[:, 1]))


def test_ids_compacted_over_all_splits_with_train_counts(tmp_path):
    raw = write_udata(tmp_path / "ml" / "u.data", n=200, users=20, items=150)
    meta = prepare_movielens(tmp_path / "ml", tmp_path / "out")
    train, val = read(tmp_path / "out", "train"), read(tmp_path / "out", "val")
    for entity, column, num in (("users", "user_id", meta.num_users), ("items", "item_id", meta.num_items)):
        counts = load_train_counts(tmp_path / "out", entity)
        assert counts.dtype == np.int64 and len(counts) == num
        assert np.array_equal(counts, np.bincount(train[column], minlength=num))
        assert set(train[column]) | set(val[column]) == set(range(num))
    item_counts = load_train_counts(tmp_path / "out", "items")
    assert (item_counts == 0).any(), "validation-only items exist with train_count 0"
    assert np.all(item_counts[np.unique(val["item_id"])] >= 0)
    # dense ids follow sorted raw ids
    vocab = load_vocab(tmp_path / "out", "users").column("raw_id").to_pylist()
    assert vocab == [str(u) for u in np.unique(raw[:, 0])]


def test_ratings_dat_and_ratings_csv(tmp_path):
    raw = write_udata(tmp_path / "a" / "u.data", n=120)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in raw))
    (tmp_path / "c" / "ml-latest-small").mkdir(parents=True)      # one level down
    (tmp_path / "c" / "ml-latest-small" / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r}.5,{t}\n" for u, i, r, t in raw))
    metas = [prepare_movielens(tmp_path / s, tmp_path / f"out_{s}") for s in "abc"]
    assert metas[0].splits == metas[1].splits == metas[2].splits
    a, b, c = (read(tmp_path / f"out_{s}", "train") for s in "abc")
    assert a == b
    assert np.allclose(np.array(c["label"]), np.array(a["label"]) + 0.5)
    assert "ml-1m/10m" in metas[1].source and "ml-20m" in metas[2].source


@pytest.mark.parametrize("seed", [0, 3])
def test_random_split(udata, tmp_path, seed):
    src, raw = udata
    meta = prepare_movielens(src, tmp_path / "out", split="random", ratio=0.7, seed=seed)
    assert meta.splits == {"train": 350, "val": 150}
    ts = np.concatenate([read(tmp_path / "out", s)["timestamp"] for s in ("train", "val")])
    assert sorted(ts) == sorted(raw[:, 3])
    expect = splits.random_split(500, 0.7, seed)["train"]
    assert np.array_equal(read(tmp_path / "out", "train")["timestamp"], raw[expect, 3])


def test_leave_last_split(udata, tmp_path):
    src, raw = udata
    prepare_movielens(src, tmp_path / "out", split="leave-last", k=2)
    train, val = read(tmp_path / "out", "train"), read(tmp_path / "out", "val")
    for user in set(val["user_id"]):
        t_train = [t for u, t in zip(train["user_id"], train["timestamp"]) if u == user]
        t_val = [t for u, t in zip(val["user_id"], val["timestamp"]) if u == user]
        assert len(t_val) == 2 and min(t_val) > max(t_train)
    counts = np.bincount(raw[:, 0])
    assert len(val["user_id"]) == 2 * int((counts > 2).sum())


def test_leave_last_keeps_users_with_few_interactions_in_train():
    rows = splits.leave_last_split(np.array([0, 0, 1, 2, 2, 2]), np.array([5, 1, 3, 2, 2, 1]), k=1)
    assert rows["val"].tolist() == [0, 4]      # user 0's latest; user 2's tie -> later row
    assert rows["train"].tolist() == [1, 2, 3, 5]


def test_temporal_split(udata, tmp_path):
    src, raw = udata
    cut = int(np.sort(raw[:, 3])[400])
    meta = prepare_movielens(src, tmp_path / "out", split="temporal", cut=cut)
    assert meta.splits == {"train": 400, "val": 100}
    assert max(read(tmp_path / "out", "train")["timestamp"]) < cut <= min(read(tmp_path / "out", "val")["timestamp"])
    meta = prepare_movielens(src, tmp_path / "q", split="temporal", cut_quantile=0.9)
    assert meta.splits == {"train": 450, "val": 50}


def test_csv_column_map_with_string_ids_and_extra_features(tmp_path):
    src = tmp_path / "log.tsv"
    src.write_text("when\tlabel\twho\twhat\tdevice\tprice\n" + "".join(
        f"{t}\t{t % 2}\tu{t % 7}\ti{t % 11}\td{t % 3}\t{t / 10}\n" for t in range(100)))
    meta = prepare_csv(src, tmp_path / "out", delimiter="\t", label_kind="click", id_type="string",
                       columns={"user": "who", "item": "what", "label": "label", "timestamp": "when",
                                "sparse_device": "device", "dense_price": "price"})
    assert (meta.num_users, meta.num_items) == (7, 11)
    assert meta.sparse_features == {"sparse_device": 3} and meta.dense_features == ["dense_price"]
    train = pq.read_table(tmp_path / "out" / "train")
    assert train.schema.field("dense_price").type.bit_width == 32
    assert load_vocab(tmp_path / "out", "sparse_device").column("raw_id").to_pylist() == ["d0", "d1", "d2"]
    assert sum(meta.splits.values()) == 100


def test_csv_without_header_by_position(tmp_path):
    src = tmp_path / "x.csv"
    src.write_text("".join(f"{u},{i},{r}\n" for u, i, r in [(1, 2, 3.0), (4, 5, 1.0), (1, 5, 2.0)] * 5))
    meta = prepare_csv(src, tmp_path / "out", header=False, columns={"user": "0", "item": "1", "label": "2"})
    assert (meta.num_users, meta.num_items, sum(meta.splits.values())) == (2, 2, 15)


def test_criteo(tmp_path):
    write_criteo(tmp_path / "criteo" / "train.txt", n=300)
    meta = prepare_criteo(tmp_path / "criteo", tmp_path / "out")
    assert meta.label_kind == "click" and sum(meta.splits.values()) == 300
    assert meta.splits["train"] == int(6 / 7 * 300)
    assert len(meta.sparse_features) == 24 and len(meta.dense_features) == 13
    train = pq.read_table(tmp_path / "out" / "train")
    assert train.num_rows == meta.splits["train"]
    assert set(np.unique(train.column("label").to_numpy())) <= {0.0, 1.0}
    assert np.array_equal(train.column("timestamp").to_numpy(), np.arange(meta.splits["train"]))
    assert np.array_equal(load_train_counts(tmp_path / "out", "users"),
                          np.bincount(train.column("user_id").to_numpy(), minlength=meta.num_users))
    raw_users = load_vocab(tmp_path / "out", "users").column("raw_id").to_pylist()
    first_line = (tmp_path / "criteo" / "train.txt").read_text().splitlines()[0].split("\t")
    assert raw_users[train.column("user_id")[0].as_py()] == first_line[1 + 13 + 2]   # C3
    rnd = prepare_criteo(tmp_path / "criteo", tmp_path / "rnd", split="random", ratio=0.5, seed=1)
    assert 100 < rnd.splits["train"] < 200
    assert json.loads((tmp_path / "rnd" / "meta.json").read_text())["split"]["method"] == "random"


def test_movielens_binary_click_labels(tmp_path, capsys):
    raw = write_udata(tmp_path / "ml" / "u.data", n=300)
    meta = prepare_movielens(tmp_path / "ml", tmp_path / "out", label_kind="click")
    assert meta.label_kind == "click" and meta.extra["click_threshold"] == 4.0
    ratings = prepare_movielens(tmp_path / "ml", tmp_path / "rating")
    for split in ("train", "val"):                  # same rows and order, only the label differs
        click, rating = read(tmp_path / "out", split), read(tmp_path / "rating", split)
        assert click["timestamp"] == rating["timestamp"]
        assert click["label"] == [float(r >= 4) for r in rating["label"]]
    assert set(read(tmp_path / "out", "train")["label"]) == {0.0, 1.0}
    from data_pipeline.__main__ import main
    assert main(["prepare", "movielens", "--src", str(tmp_path / "ml"), "--out", str(tmp_path / "t5"),
                 "--label-kind", "click", "--click-threshold", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["label_kind"] == "click"
    labels = np.concatenate([read(tmp_path / "t5", s)["label"] for s in ("train", "val")])
    assert labels.sum() == (raw[:, 2] >= 5).sum()
    assert main(["prepare", "movielens", "--src", str(tmp_path / "ml"), "--out", str(tmp_path / "x"),
                 "--click-threshold", "3"]) == 2
    assert "only with --label-kind click" in capsys.readouterr().err
    assert ratings.label_kind == "rating"
