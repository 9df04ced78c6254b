"""prepare movielens --drop-ratings: the CCE paper's MovieLens protocol (rating 3 dropped, click =
rating >= 4, the last 2 interactions per user by timestamp held out), on small generated files."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from data_pipeline.__main__ import main
from data_pipeline.dataset import load_meta, load_vocab
from data_pipeline.sources.movielens import prepare_movielens
from dp_inputs import write_udata


def read(out, split):
    return pq.read_table(out / split).to_pydict()


def test_drop_ratings_before_compaction_and_leave_last_split(tmp_path, capsys):
    raw = write_udata(tmp_path / "ml" / "u.data", n=600, users=30, items=80, seed=3)
    # user 999 and item 999 rate only 3s: they must vanish from the vocabularies
    extra = np.array([[999, 999, 3, 870_000_000 + j] for j in range(4)])
    with open(tmp_path / "ml" / "u.data", "a") as f:
        f.write("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in extra))
    assert main(["prepare", "movielens", "--src", str(tmp_path / "ml"), "--out", str(tmp_path / "out"),
                 "--drop-ratings", "3", "--label-kind", "click", "--click-threshold", "4",
                 "--split", "leave-last", "--k", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    kept = raw[raw[:, 2] != 3]
    out = tmp_path / "out"
    meta = load_meta(out)
    assert report["rows"] == len(kept) and sum(meta.splits.values()) == len(kept)
    assert meta.extra["drop_ratings"] == [3.0] and meta.extra["click_threshold"] == 4.0
    assert meta.split == {"method": "leave-last", "k": 2}
    # ids compacted after dropping: only the raw ids with a kept row, dense 0..n-1
    users = load_vocab(out, "users").column("raw_id").to_pylist()
    items = load_vocab(out, "items").column("raw_id").to_pylist()
    assert sorted(users, key=int) == [str(u) for u in np.unique(kept[:, 0])]
    assert sorted(items, key=int) == [str(i) for i in np.unique(kept[:, 1])]
    assert "999" not in users and "999" not in items
    assert (meta.num_users, meta.num_items) == (len(users), len(items))
    train, val = read(out, "train"), read(out, "val")
    assert set(train["user_id"]) | set(val["user_id"]) == set(range(meta.num_users))
    assert set(train["item_id"]) | set(val["item_id"]) == set(range(meta.num_items))
    # labels: rating >= 4 of the kept rows (rows keyed by their unique timestamp)
    by_ts = {int(t): (u, i, r) for u, i, r, t in kept}
    for split in (train, val):
        for u, i, y, t in zip(split["user_id"], split["item_id"], split["label"], split["timestamp"]):
            ru, ri, r = by_ts[t]
            assert (users[u], items[i]) == (str(ru), str(ri))
            assert r != 3 and y == float(r >= 4)
    # leave-last: each user with > 2 kept rows holds out exactly their 2 latest ones
    counts = {u: int((kept[:, 0] == int(users[u])).sum()) for u in range(meta.num_users)}
    for u in range(meta.num_users):
        t_train = [t for uu, t in zip(train["user_id"], train["timestamp"]) if uu == u]
        t_val = [t for uu, t in zip(val["user_id"], val["timestamp"]) if uu == u]
        if counts[u] > 2:
            assert len(t_val) == 2 and min(t_val) > max(t_train)
        else:
            assert not t_val and len(t_train) == counts[u]


def test_drop_ratings_api_errors_and_no_op(tmp_path, capsys):
    write_udata(tmp_path / "ml" / "u.data", n=200)
    plain = prepare_movielens(tmp_path / "ml", tmp_path / "plain")
    none = prepare_movielens(tmp_path / "ml", tmp_path / "none", drop_ratings=[])   # nothing dropped
    assert plain.splits == none.splits and "drop_ratings" not in none.extra
    two = prepare_movielens(tmp_path / "ml", tmp_path / "two", drop_ratings=[1, 2.0])
    labels = np.concatenate([read(tmp_path / "two", s)["label"] for s in ("train", "val")])
    assert two.extra == {"drop_ratings": [1.0, 2.0]} and set(labels) <= {3.0, 4.0, 5.0}
    assert main(["prepare", "movielens", "--src", str(tmp_path / "ml"), "--out", str(tmp_path / "x"),
                 "--drop-ratings", "1,2,3,4,5"]) == 2
    assert "removes every row" in capsys.readouterr().err
    assert main(["prepare", "movielens", "--src", str(tmp_path / "ml"), "--out", str(tmp_path / "y"),
                 "--drop-ratings", "three"]) == 2
    assert "--drop-ratings must be a comma-separated list" in capsys.readouterr().err
