"""A prepared dataset directory: metadata, vocabularies, split files and the atomic writer.

Layout (see docs/interfaces.md):
    DIR/meta.json                     DatasetMeta
    DIR/<split>/part-00000.parquet    one Parquet dataset per split (train, val), schema.py
    DIR/vocab/users.parquet           id:int64 (dense), raw_id:string, train_count:int64
    DIR/vocab/items.parquet           same for items
    DIR/vocab/sparse_<name>.parquet   same for each extra categorical feature
    DIR/planted/{users,items}.parquet synthetic data only: id:int64, cluster:int64
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import uuid
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline import schema
from data_pipeline.errors import DataError

ROW_GROUP_ROWS = 131_072
FILE_ROWS = 8 * ROW_GROUP_ROWS
FORMAT_VERSION = 1
PROGRESS_DELAY_S = 2.0            # progress bars appear only on conversions longer than this


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """What a trainer needs to size its tables and report its data."""
    num_users: int
    num_items: int
    splits: dict[str, int]                       # split name -> rows
    label_kind: str                              # "rating" | "click"
    sparse_features: dict[str, int] = dataclasses.field(default_factory=dict)  # column -> cardinality
    dense_features: list[str] = dataclasses.field(default_factory=list)        # column names
    source: str = ""
    split: dict[str, Any] = dataclasses.field(default_factory=dict)           # how splits were made
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"


def load_meta(directory: str | os.PathLike) -> DatasetMeta:
    """Read DIR/meta.json."""
    path = pathlib.Path(directory) / "meta.json"
    if not path.exists():
        raise DataError(f"{path}: missing; not a prepared dataset (run `python -m data_pipeline "
                        f"prepare ...` or `synth` first)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    fields = {f.name for f in dataclasses.fields(DatasetMeta)}
    missing = {"num_users", "num_items", "splits", "label_kind"} - raw.keys()
    if missing:
        raise DataError(f"{path}: missing keys {sorted(missing)}")
    return DatasetMeta(**{k: v for k, v in raw.items() if k in fields})


def load_vocab(directory: str | os.PathLike, entity: str) -> pa.Table:
    """DIR/vocab/<entity>.parquet (entity: users, items or sparse_<name>), validated."""
    path = pathlib.Path(directory) / "vocab" / f"{entity}.parquet"
    if not path.exists():
        raise DataError(f"{path}: missing vocabulary file")
    table = read_parquet_file(path)
    for name in ("id", "raw_id", "train_count"):
        if name not in table.column_names:
            raise DataError(f"{path}: missing column '{name}'")
    ids = table.column("id").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise DataError(f"{path}: column 'id' is not the dense range 0..{len(ids) - 1}")
    return table


def load_train_counts(directory: str | os.PathLike, entity: str) -> np.ndarray:
    """Training interactions per entity, np.int64[num_entities] indexed by dense id
    (entity: "users" or "items"; 0 marks an entity seen only outside train: cold)."""
    table = load_vocab(directory, entity)
    return np.ascontiguousarray(table.column("train_count").to_numpy(), dtype=np.int64)


def load_planted(directory: str | os.PathLike, entity: str,
                 missing_ok: bool = False) -> np.ndarray | None:
    """Synthetic data only: the planted cluster of each entity, np.int64[num_entities] indexed
    by dense id (entity: "users" or "items"). A dataset without planted clusters (any real one)
    raises DataError, or gives None with `missing_ok`."""
    path = pathlib.Path(directory) / "planted" / f"{entity}.parquet"
    if not path.exists():
        if missing_ok:
            return None
        raise DataError(f"{path}: missing (only synthetic datasets have planted clusters)")
    table = read_parquet_file(path)
    cluster = table.column("cluster").to_numpy().astype(np.int64)
    ids = table.column("id").to_numpy().astype(np.int64)
    if not np.array_equal(ids, np.arange(ids.size)):        # written in id order; else reorder
        if np.unique(ids).size != ids.size or ids.min() < 0 or ids.max() >= ids.size:
            raise DataError(f"{path}: ids are not a permutation of 0..{ids.size - 1}")
        out = np.empty_like(cluster)
        out[ids] = cluster
        cluster = out
    return cluster


def read_parquet_file(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """pq.read_table with unreadable/truncated files reported as DataError naming the file."""
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise DataError(f"{path}: unreadable Parquet file ({exc})") from None


def split_files(directory: str | os.PathLike) -> list[pathlib.Path]:
    """The Parquet files of one split directory, in name order."""
    path = pathlib.Path(directory)
    if not path.is_dir():
        raise DataError(f"{path}: split directory missing")
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise DataError(f"{path}: no Parquet files")
    return files


def split_dir(directory: str | os.PathLike, split: str) -> pathlib.Path:
    return pathlib.Path(directory) / split


# ----------------------------------------------------------------------------- writing
def check_output(out: str | os.PathLike, overwrite: bool) -> None:
    """Fail early (before any work) when `out` exists and may not be replaced."""
    if pathlib.Path(out).exists() and not overwrite:
        raise DataError(f"{out}: output already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yield a fresh temporary sibling of `out`; rename it to `out` only when the block finishes
    without an exception, so a failure never leaves a half-written dataset behind."""
    out = pathlib.Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            os.rename(tmp, out)
        except OSError:          # another process finished first (ensure_synthetic races)
            shutil.rmtree(tmp, ignore_errors=True)
            if not (out / "meta.json").exists():
                raise


def compact_ids(values: pa.Array | pa.ChunkedArray | np.ndarray) -> tuple[np.ndarray, pa.Array]:
    """Map raw ids to the dense range 0..n-1 in sorted raw-id order.
    Returns (dense int64 ids, vocabulary: the raw value of each dense id)."""
    if isinstance(values, np.ndarray):
        vocab, dense = np.unique(values, return_inverse=True)
        return dense.astype(np.int64).reshape(-1), pa.array(vocab)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_integer(values.type):
        vocab, dense = np.unique(values.to_numpy(), return_inverse=True)
        return dense.astype(np.int64).reshape(-1), pa.array(vocab)
    vocab = pc.unique(values)
    vocab = vocab.take(pc.sort_indices(vocab))
    dense = pc.index_in(values, value_set=vocab).to_numpy(zero_copy_only=False)
    return dense.astype(np.int64), vocab


def vocab_table(raw: pa.Array, train_count: np.ndarray) -> pa.Table:
    """id (dense), raw_id (as string), train_count."""
    return pa.table({"id": pa.array(np.arange(len(raw), dtype=np.int64)),
                     "raw_id": pc.cast(raw, pa.string()),
                     "train_count": pa.array(np.asarray(train_count, dtype=np.int64))})


def write_table(table: pa.Table, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)


class SplitWriter:
    """Appends batches to DIR/<split>/part-NNNNN.parquet, starting a new file every FILE_ROWS
    rows and a new row group every ROW_GROUP_ROWS rows (pass whole row groups for best layout)."""

    def __init__(self, directory: pathlib.Path, split: str, arrow_schema: pa.Schema,
                 file_rows: int = FILE_ROWS, row_group_rows: int = ROW_GROUP_ROWS):
        self.path = directory / split
        self.path.mkdir(parents=True, exist_ok=True)
        self.schema = arrow_schema
        self.file_rows = file_rows
        self.row_group_rows = row_group_rows
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_index = 0
        self._rows_in_file = 0

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        start = 0
        while start < table.num_rows:
            if self._writer is None or self._rows_in_file >= self.file_rows:
                self._open_next()
            take = min(table.num_rows - start, self.file_rows - self._rows_in_file)
            self._writer.write_table(table.slice(start, take), row_group_size=self.row_group_rows)
            self._rows_in_file += take
            self.rows += take
            start += take

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = pq.ParquetWriter(self.path / f"part-{self._file_index:05d}.parquet",
                                        self.schema)
        self._file_index += 1
        self._rows_in_file = 0

    def close(self) -> int:
        if self._writer is None:              # an empty split still gets one (empty) file
            self._open_next()
        self._writer.close()
        return self.rows


def columns_table(columns: Mapping[str, np.ndarray], arrow_schema: pa.Schema) -> pa.Table:
    return pa.table({name: pa.array(columns[name], type=arrow_schema.field(name).type)
                     for name in arrow_schema.names}, schema=arrow_schema)


def write_dataset(out_tmp: pathlib.Path, columns: Mapping[str, np.ndarray],
                  split_rows: Mapping[str, np.ndarray], *, user_vocab: pa.Array,
                  item_vocab: pa.Array, label_kind: str, source: str, split_info: dict,
                  sparse_vocabs: Mapping[str, pa.Array] | None = None,
                  dense: Sequence[str] = (), extra: dict | None = None,
                  progress: Any = None) -> DatasetMeta:
    """Write an in-memory dataset (dense-id columns + per-split row indices, in output order)
    into `out_tmp`: splits, vocabularies with train counts, meta.json."""
    sparse_vocabs = dict(sparse_vocabs or {})
    arrow_schema = schema.arrow_schema(list(sparse_vocabs), list(dense))
    meta_splits = {}
    for split, rows in split_rows.items():
        writer = SplitWriter(out_tmp, split, arrow_schema)
        for start in range(0, len(rows), ROW_GROUP_ROWS):
            index = rows[start:start + ROW_GROUP_ROWS]
            writer.write(columns_table({k: v[index] for k, v in columns.items()}, arrow_schema))
            if progress is not None:
                progress.update(len(index))
        meta_splits[split] = writer.close()
    train = split_rows["train"]
    num_users, num_items = len(user_vocab), len(item_vocab)
    write_table(vocab_table(user_vocab, np.bincount(columns[schema.USER][train], minlength=num_users)),
                out_tmp / "vocab" / "users.parquet")
    write_table(vocab_table(item_vocab, np.bincount(columns[schema.ITEM][train], minlength=num_items)),
                out_tmp / "vocab" / "items.parquet")
    for name, vocab in sparse_vocabs.items():
        write_table(vocab_table(vocab, np.bincount(columns[name][train], minlength=len(vocab))),
                    out_tmp / "vocab" / f"{name}.parquet")
    meta = DatasetMeta(num_users=num_users, num_items=num_items, splits=meta_splits,
                       label_kind=label_kind,
                       sparse_features={k: len(v) for k, v in sparse_vocabs.items()},
                       dense_features=list(dense), source=source, split=split_info,
                       extra=dict(extra or {}))
    (out_tmp / "meta.json").write_text(meta.to_json())
    return meta


def progress_bar(total: int | None, desc: str, unit: str = "rows"):
    """A tqdm bar on stderr that appears only once the work has run for PROGRESS_DELAY_S, and
    only in the main process of a distributed launch ($RANK unset or 0)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                mininterval=1.0, delay=PROGRESS_DELAY_S, leave=False, dynamic_ncols=True,
                disable=os.environ.get("RANK", "0") not in ("", "0"))
