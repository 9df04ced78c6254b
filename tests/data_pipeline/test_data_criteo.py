"""Criteo conversion: frequency ids, OOV and missing values, the dense transform, malformed lines
named by file/line/field, independence of the block size."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.__main__ import main
from data_pipeline.dataset import load_meta, load_train_counts, load_vocab
from data_pipeline.errors import DataError
from data_pipeline.sources import criteo
from data_pipeline.sources.criteo import _hex_keys, _IdMap, prepare_criteo
from dp_inputs import write_criteo


def line(label=0, ints=None, cats=None) -> str:
    """One Criteo line; `ints` / `cats` map a column name (I5, C3) to its raw text."""
    ints, cats = ints or {}, cats or {}
    fields = [str(label), *(ints.get(f"I{i}", str(i)) for i in range(1, 14)),
              *(cats.get(f"C{i}", "0000abcd") for i in range(1, 27))]
    return "\t".join(fields)


def write(path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x}\n" for x in lines))


def rows(out):
    return pq.read_table(out / "train").to_pydict(), pq.read_table(out / "val").to_pydict()


# C3 (user role) counts: 05 x4, 0a x3, 0b x3 (tie: byte order), "" (missing) x2, ff x1;
# C5 (not hex) counts: zeta x5, alpha x4, beta x4.
C3 = ["05"] * 4 + ["0a"] * 3 + ["0b"] * 3 + [""] * 2 + ["ff"]
C5 = ["zeta"] * 5 + ["alpha"] * 4 + ["beta"] * 4


def frequency_input(path):
    order = np.random.default_rng(0).permutation(len(C3))        # counts, not order, decide
    write(path, [line(label=i % 2, cats={"C3": C3[j], "C5": C5[j]}) for i, j in enumerate(order)])
    return [C3[j] for j in order], [C5[j] for j in order]


def test_ids_by_descending_count_ties_by_raw_string(tmp_path):
    c3, c5 = frequency_input(tmp_path / "train.txt")
    meta = prepare_criteo(tmp_path / "train.txt", tmp_path / "out", split="random", ratio=0.5)
    users = load_vocab(tmp_path / "out", "users").to_pydict()
    assert users["raw_id"] == ["<oov>", "05", "0a", "0b", "", "ff"]
    assert users["count"] == [0, 4, 3, 3, 2, 1]
    c5_vocab = load_vocab(tmp_path / "out", "sparse_C5").to_pydict()       # the index_in path
    assert c5_vocab["raw_id"] == ["<oov>", "zeta", "alpha", "beta"]
    assert meta.num_users == 6 and meta.sparse_features["sparse_C5"] == 4
    assert meta.num_items == 2                        # C4: one value plus the (unused) OOV id
    train, val = rows(tmp_path / "out")
    for part in (train, val):                         # every row maps back to its raw value
        for t, u, s in zip(part["timestamp"], part["user_id"], part["sparse_C5"]):
            assert users["raw_id"][u] == c3[t] and c5_vocab["raw_id"][s] == c5[t]
    counts = load_train_counts(tmp_path / "out", "users")
    assert np.array_equal(counts, np.bincount(train["user_id"], minlength=6))
    assert counts[0] == 0                             # min_count 1: nothing is OOV
    assert meta.extra["min_count"] == 1 and meta.extra["oov_id"] == 0


def test_min_count_folds_rare_values_into_oov(tmp_path):
    c3, c5 = frequency_input(tmp_path / "train.txt")
    meta = prepare_criteo(tmp_path / "train.txt", tmp_path / "out", min_count=3, cut=10)
    users = load_vocab(tmp_path / "out", "users").to_pydict()
    assert users["raw_id"] == ["<oov>", "05", "0a", "0b"]          # "" (x2) and ff (x1) -> 0
    assert users["count"] == [3, 4, 3, 3]
    assert meta.num_users == 4 and meta.sparse_features["sparse_C5"] == 4
    train, val = rows(tmp_path / "out")
    ids = dict(zip(train["timestamp"] + val["timestamp"], train["user_id"] + val["user_id"]))
    for t, raw in enumerate(c3):
        assert ids[t] == (users["raw_id"].index(raw) if raw in users["raw_id"] else 0)
    assert sum(users["train_count"]) == meta.splits["train"] == 10
    with pytest.raises(DataError, match="--min-count must be >= 1"):
        prepare_criteo(tmp_path / "train.txt", tmp_path / "x", min_count=0)


def test_missing_values_and_dense_transform(tmp_path):
    write(tmp_path / "t.txt", [line(1, ints={"I1": "", "I2": "-3", "I3": "7"}, cats={"C1": ""}),
                               line(0, ints={"I1": "0", "I2": "", "I3": " 0x10 "}, cats={"C1": ""}),
                               line(0, cats={"C1": "00aa"})] * 3)
    prepare_criteo(tmp_path / "t.txt", tmp_path / "out", cut=6)
    train, _ = rows(tmp_path / "out")
    assert train["dense_I1"][:3] == [0.0, 0.0, np.float32(np.log1p(1))]       # missing -> 0
    assert train["dense_I2"][:2] == [0.0, 0.0]                                # negative -> 0
    assert train["dense_I3"][:2] == [np.float32(np.log1p(7)), np.float32(np.log1p(16))]
    vocab = load_vocab(tmp_path / "out", "sparse_C1").column("raw_id").to_pylist()
    assert vocab == ["<oov>", "", "00aa"]             # missing is its own (here frequent) value
    assert train["sparse_C1"][:3] == [1, 1, 2]


BAD = [  # (line text, expected message after "train.txt:LINE: ")
    ("\t".join(line().split("\t")[:39]), "expected 40 tab-separated fields .* got 39 fields"),
    (line() + "\textra", "expected 40 tab-separated fields .* got 41 fields"),
    ("", "expected 40 tab-separated fields .* got an empty line"),
    (line(ints={"I5": "abc"}), "field 'I5': cannot parse 'abc' as integer"),
    (line(ints={"I13": "1.5"}), "field 'I13': cannot parse '1.5' as integer"),
    (line(ints={"I1": "+3"}), "field 'I1': cannot parse '\\+3' as integer"),
    (line(label=2), "field 'label': click label must be 0 or 1, got 2"),
    ("x" + line()[1:], "field 'label': click label must be 0 or 1, got 'x'"),
    (line()[1:], "field 'label': missing click label"),
]


@pytest.mark.parametrize("bad, expected", BAD)
def test_malformed_line_names_file_line_and_field(tmp_path, monkeypatch, bad, expected):
    monkeypatch.setattr(criteo, "BLOCK_BYTES", 4096)        # the bad line is several blocks in
    good = [line(label=i % 2, cats={"C3": format(i % 17, "08x")}) for i in range(200)]
    write(tmp_path / "d" / "train.txt", good[:137] + [bad] + good[137:])
    with pytest.raises(DataError, match=rf"d/train.txt:138: {expected}"):
        prepare_criteo(tmp_path / "d", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_malformed_line_in_a_gzip_day_file(tmp_path):
    write(tmp_path / "d" / "day_0", [line()] * 5)
    with gzip.open(tmp_path / "d" / "day_1.gz", "wt") as f:
        f.write("".join(f"{x}\n" for x in [line()] * 3 + [line(ints={"I2": "7e"})]))
    with pytest.raises(DataError, match=r"day_1.gz:4: field 'I2': cannot parse '7e'"):
        prepare_criteo(tmp_path / "d", tmp_path / "out")


def test_non_utf8_categorical(tmp_path):
    (tmp_path / "t.txt").write_bytes((line() + "\n").encode() * 2
                                     + line(cats={"C7": "@"}).encode().replace(b"@", b"\xff") + b"\n")
    with pytest.raises(DataError, match=r"t.txt:3: field 'C7': not valid UTF-8"):
        prepare_criteo(tmp_path / "t.txt", tmp_path / "out")


@pytest.mark.parametrize("split", ["temporal", "random"])
def test_output_independent_of_block_size(tmp_path, monkeypatch, split):
    write_criteo(tmp_path / "train.txt", n=1500, seed=3)
    outputs = []
    for block in (2048, 1 << 26):
        monkeypatch.setattr(criteo, "BLOCK_BYTES", block)
        out = tmp_path / f"out{block}"
        meta = prepare_criteo(tmp_path / "train.txt", out, split=split, min_count=2)
        tables = {s: pq.read_table(out / s) for s in ("train", "val")}
        vocabs = {p.stem: pq.read_table(p) for p in sorted((out / "vocab").glob("*.parquet"))}
        outputs.append((meta, tables, vocabs))
    (meta_a, tables_a, vocab_a), (meta_b, tables_b, vocab_b) = outputs
    assert meta_a.to_json() == meta_b.to_json()
    assert all(tables_a[s].equals(tables_b[s]) for s in tables_a)
    assert vocab_a.keys() == vocab_b.keys() and all(vocab_a[k].equals(vocab_b[k]) for k in vocab_a)
    assert len(vocab_a) == 26


def test_hex_keys_are_distinct_and_the_fallback_agrees():
    values = pa.array(["a", "0a", "00a", "", "fffffffffffffff", "0", "00"])
    keys = _hex_keys(values)
    assert len(set(keys.tolist())) == len(values)
    assert _hex_keys(pa.array(["A"])) is None and _hex_keys(pa.array(["0" * 16])) is None
    kept = pa.array(["0b", "05", ""])
    id_map = _IdMap(kept)
    assert id_map.sorted_keys is not None
    block = pa.array(["05", None, "0b", "07", "05"])
    assert id_map(block).tolist() == [2, 3, 1, 0, 2]
    assert id_map(pa.array(["05", "zz"])).tolist() == [2, 0]       # non-hex block: index_in
    assert _IdMap(pa.array(["zz", "05"]))(block).tolist() == [2, 0, 0, 0, 2]
    assert _IdMap(pa.array([], pa.string()))(block).tolist() == [0] * 5


def test_cli_min_count(tmp_path, capsys):
    frequency_input(tmp_path / "c" / "train.txt")
    assert main(["prepare", "criteo", "--src", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
                 "--min-count", "3", "--user-col", "C5", "--item-col", "C3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["users"] == 4 and report["items"] == 4
    assert load_meta(tmp_path / "o").extra["min_count"] == 3
