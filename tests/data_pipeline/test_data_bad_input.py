"""Bad input: a DataError naming file, column, row and value; no half-written output."""
from __future__ import annotations

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.dataset import load_meta
from data_pipeline.errors import DataError
from data_pipeline.local import ParquetBatchReader
from data_pipeline.sources.criteo import prepare_criteo
from data_pipeline.sources.csv import prepare_csv
from data_pipeline.sources.movielens import prepare_movielens
from data_pipeline.synthetic import generate_synthetic
from dp_inputs import write_criteo

GOOD = ["1\t10\t3\t100", "2\t20\t4\t101", "3\t10\t5\t102", "1\t30\t2\t103", "2\t30\t1\t104"]


def udata_with(tmp_path: pathlib.Path, line_no: int | None, line: str) -> pathlib.Path:
    lines = list(GOOD)
    if line_no is not None:
        lines[line_no] = line
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "u.data").write_text("\n".join(lines) + "\n")
    return tmp_path / "src"


def assert_clean(tmp_path: pathlib.Path) -> None:
    """Nothing half-written: no output and no temporary directory left behind."""
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("line_no, line, expected", [
    (2, "3\tabc\t5\t102", ["u.data", "'item'", "row 2", "line 3", "'abc'"]),        # non-numeric id
    (1, "x2\t20\t4\t101", ["'user'", "row 1", "'x2'"]),
    (3, "1\t30\tnan\t103", ["'rating'", "row 3", "not finite"]),                      # NaN label
    (4, "2\t30\tinf\t104", ["'rating'", "row 4", "inf"]),                             # inf label
    (0, "-1\t10\t3\t100", ["'user'", "row 0", "negative id -1"]),                     # negative id
    (1, "2\t20\t4", ["u.data", "Expected 4 columns, got 3"]),                          # missing column
    (2, "3\t\t5\t102", ["'item'", "row 2", "missing value"]),                         # empty field
])
def test_bad_u_data(tmp_path, line_no, line, expected):
    src = udata_with(tmp_path, line_no, line)
    with pytest.raises(DataError) as info:
        prepare_movielens(src, tmp_path / "out")
    for text in expected:
        assert text in str(info.value), str(info.value)
    assert_clean(tmp_path)


def test_missing_source(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        prepare_movielens(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no MovieLens ratings file"):
        prepare_movielens(tmp_path / "empty_dir", tmp_path / "out")
    with pytest.raises(DataError, match="no such file"):
        prepare_csv(tmp_path / "nope.csv", tmp_path / "out", columns={"user": "a", "item": "b", "label": "c"})
    with pytest.raises(DataError, match="no such file or directory"):
        prepare_criteo(tmp_path / "nope", tmp_path / "out")


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_input(tmp_path, content):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "u.data").write_text(content)
    with pytest.raises(DataError, match="empty input"):
        prepare_movielens(tmp_path / "src", tmp_path / "out")
    assert_clean(tmp_path)


def test_ratings_csv_missing_column(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ratings.csv").write_text("userId,itemId,rating,timestamp\n1,2,3,4\n")
    with pytest.raises(DataError, match=r"ratings.csv: missing column 'movieId'"):
        prepare_movielens(tmp_path / "src", tmp_path / "out")
    assert_clean(tmp_path)


def test_csv_wrong_column_map(tmp_path):
    src = tmp_path / "x.csv"
    src.write_text("u,i,r\n1,2,3\n")
    with pytest.raises(DataError, match=r"x.csv: missing column 'rating' \(for label"):
        prepare_csv(src, tmp_path / "out", columns={"user": "u", "item": "i", "label": "rating"})
    with pytest.raises(DataError, match="needs a column for 'item'"):
        prepare_csv(src, tmp_path / "out", columns={"user": "u", "label": "r"})
    assert_clean(tmp_path)


def test_csv_click_labels_must_be_binary(tmp_path):
    src = tmp_path / "x.csv"
    src.write_text("u,i,r\n1,2,1\n1,3,0\n2,2,7\n")
    with pytest.raises(DataError, match=r"column 'r' row 2 \(line 4\): click label must be 0 or 1, got 7"):
        prepare_csv(src, tmp_path / "out", label_kind="click", columns={"user": "u", "item": "i", "label": "r"})


def test_criteo_bad_label_and_bad_integer(tmp_path):
    write_criteo(tmp_path / "a" / "train.txt", n=20)
    lines = (tmp_path / "a" / "train.txt").read_text().splitlines()
    lines[5] = "2" + lines[5][1:]
    (tmp_path / "a" / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.txt:6: field 'label': .*got 2"):
        prepare_criteo(tmp_path / "a", tmp_path / "out")
    fields = lines[7].split("\t")
    lines[5] = "1" + lines[5][1:]
    lines[7] = "\t".join([fields[0], "12x", *fields[2:]])
    (tmp_path / "a" / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.txt:8: field 'I1': cannot parse '12x'"):
        prepare_criteo(tmp_path / "a", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_and_wrong_schema_parquet(tmp_path):
    generate_synthetic(tmp_path / "ds", users=50, items=40, interactions=2000, clusters=2)
    part = tmp_path / "ds" / "train" / "part-00000.parquet"
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"part-00000.parquet: unreadable Parquet"):
        ParquetBatchReader(tmp_path / "ds" / "train", batch_size=64)
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"user_id": pa.array([1], pa.int64()), "item_id": pa.array([1.5]),
                             "label": pa.array([1.0], pa.float32()),
                             "timestamp": pa.array([0], pa.int64())}), bad / "part-00000.parquet")
    with pytest.raises(DataError, match=r"part-00000.parquet: column 'item_id' has type double"):
        ParquetBatchReader(bad, batch_size=4)
    pq.write_table(pa.table({"user_id": pa.array([1], pa.int64())}), bad / "part-00000.parquet")
    with pytest.raises(DataError, match=r"missing column 'item_id'"):
        ParquetBatchReader(bad, batch_size=4)


def test_negative_and_nan_values_in_parquet_are_named_on_read(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"user_id": pa.array([1, 2, -3], pa.int64()), "item_id": pa.array([0, 0, 0], pa.int64()),
                             "label": pa.array([1.0, np.nan, 1.0], pa.float32()),
                             "timestamp": pa.array([0, 1, 2], pa.int64())}), bad / "part-00000.parquet")
    with pytest.raises(DataError, match=r"part-00000.parquet: column '(user_id' row 2: negative id -3|label' row 1)"):
        list(ParquetBatchReader(bad, batch_size=4, shuffle=False))


def test_missing_meta(tmp_path):
    with pytest.raises(DataError, match="meta.json: missing"):
        load_meta(tmp_path)


def test_existing_output_is_kept_and_failure_leaves_it_intact(tmp_path, udata):
    src, _ = udata
    prepare_movielens(src, tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    with pytest.raises(DataError, match="already exists"):
        prepare_movielens(src, tmp_path / "out")
    (src / "u.data").write_text("1\t2\tbad\t4\n")
    with pytest.raises(DataError):
        prepare_movielens(src, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
