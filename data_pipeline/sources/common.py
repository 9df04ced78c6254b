"""Shared pieces of the source converters: a diagnosing delimited-text reader, raw-value checks,
and the in-memory "raw interactions -> dense ids -> splits -> dataset directory" step."""
from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data_pipeline import schema
from data_pipeline.dataset import (DatasetMeta, atomic_output_dir, compact_ids, progress_bar,
                                   write_dataset)
from data_pipeline.errors import DataError
from data_pipeline.splits import make_split

BLOCK_BYTES = 16 << 20
_INT_PATTERN = r"^\s*[+-]?\d+\s*$"
_FLOAT_PATTERN = r"^\s*[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|nan|NaN|inf|-inf|Inf)\s*$"


def read_header(path: pathlib.Path, delimiter: str) -> list[str]:
    with open(path, "rb") as f:
        line = f.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    if not line.strip():
        raise DataError(f"{path}: empty input (no header line)")
    return [c.strip() for c in line.split(delimiter)]


def read_delimited(path: pathlib.Path, *, delimiter: str, column_names: Sequence[str],
                   types: Mapping[str, pa.DataType], header: bool,
                   data: bytes | None = None, desc: str = "read") -> pa.Table:
    """Read the `types` columns of a delimited text file (or of `data`, its bytes after a
    rewrite) into Arrow, streaming in blocks with a progress bar. A value that does not parse
    is reported as file, column, row, line and value."""
    source_size = len(data) if data is not None else os.path.getsize(path)
    if source_size == 0:
        raise DataError(f"{path}: empty input (0 bytes)")
    read_options = pacsv.ReadOptions(column_names=list(column_names), skip_rows=int(header),
                                     block_size=BLOCK_BYTES)
    parse_options = pacsv.ParseOptions(delimiter=delimiter)
    convert_options = pacsv.ConvertOptions(column_types=dict(types), include_columns=list(types),
                                            null_values=[""])
    stream = pa.BufferReader(data) if data is not None else pa.OSFile(str(path))
    batches = []
    try:
        with progress_bar(source_size, desc=f"{desc} {path.name}", unit="B") as bar:
            reader = pacsv.open_csv(stream, read_options=read_options, parse_options=parse_options,
                                    convert_options=convert_options)
            position = 0
            for batch in reader:
                batches.append(batch)
                now = stream.tell() if hasattr(stream, "tell") else position
                bar.update(max(0, now - position))
                position = now
            table = pa.Table.from_batches(batches, schema=reader.schema)
    except pa.ArrowInvalid as exc:
        message = str(exc)
        if "conversion error" in message.lower():
            _diagnose_conversion(path, data, read_options, parse_options, types, header)
        raise DataError(f"{path}: cannot parse ({message.splitlines()[0]})") from None
    finally:
        stream.close()
    if table.num_rows == 0:
        raise DataError(f"{path}: empty input (no data rows)")
    return table


def _diagnose_conversion(path, data, read_options, parse_options, types, header) -> None:
    """Slow path, only after a failure: re-read as strings and name the first bad value."""
    strings = pacsv.read_csv(pa.BufferReader(data) if data is not None else str(path),
                             read_options=read_options, parse_options=parse_options,
                             convert_options=pacsv.ConvertOptions(
                                 column_types={c: pa.string() for c in types},
                                 include_columns=list(types), strings_can_be_null=False))
    for name, dtype in types.items():
        pattern = _INT_PATTERN if pa.types.is_integer(dtype) else _FLOAT_PATTERN
        column = strings.column(name)
        ok = pc.match_substring_regex(column, pattern)
        bad = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
        if bad.size:
            row = int(bad[0])
            kind = "integer" if pa.types.is_integer(dtype) else "number"
            raise DataError(f"{path}: column '{name}' row {row} (line {row + 1 + int(header)}): "
                            f"expected {kind}, got {column[row].as_py()!r}")


def check_raw(table: pa.Table, path: pathlib.Path, *, id_columns: Sequence[str],
              label_column: str, header: bool, label_kind: str | None = None) -> None:
    """Missing values, negative integer ids, NaN/inf labels; error names row and line."""
    def where(name, row):
        return f"{path}: column '{name}' row {row} (line {row + 1 + int(header)})"

    for name in table.column_names:
        column = table.column(name)
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{where(name, row)}: missing value")
    for name in id_columns:
        column = table.column(name)
        if pa.types.is_integer(column.type):
            values = column.to_numpy()
            bad = np.flatnonzero(values < 0)
            if bad.size:
                raise DataError(f"{where(name, int(bad[0]))}: negative id {int(values[bad[0]])}")
    labels = table.column(label_column).to_numpy()
    bad = np.flatnonzero(~np.isfinite(labels))
    if bad.size:
        raise DataError(f"{where(label_column, int(bad[0]))}: label {labels[bad[0]]:g} is not finite")
    if label_kind == "click":
        bad = np.flatnonzero((labels != 0) & (labels != 1))
        if bad.size:
            raise DataError(f"{where(label_column, int(bad[0]))}: click label must be 0 or 1, "
                            f"got {labels[bad[0]]:g}")


def build_dataset(out: str | os.PathLike, *, user: pa.ChunkedArray, item: pa.ChunkedArray,
                  label: np.ndarray, timestamp: np.ndarray, label_kind: str, source: str,
                  split: str, split_args: Mapping[str, Any],
                  sparse: Mapping[str, pa.ChunkedArray] | None = None,
                  dense: Mapping[str, np.ndarray] | None = None, overwrite: bool = False,
                  extra: dict | None = None) -> DatasetMeta:
    """Compact ids over all rows, split, and write the dataset directory atomically."""
    sparse, dense = dict(sparse or {}), dict(dense or {})
    user_dense, user_vocab = compact_ids(user)
    item_dense, item_vocab = compact_ids(item)
    columns = {schema.USER: user_dense, schema.ITEM: item_dense,
               schema.LABEL: np.asarray(label, dtype=np.float32),
               schema.TIMESTAMP: np.asarray(timestamp, dtype=np.int64)}
    sparse_vocabs = {}
    for name, values in sparse.items():
        columns[name], sparse_vocabs[name] = compact_ids(values)
    for name, values in dense.items():
        columns[name] = np.asarray(values, dtype=np.float32)
    rows, split_info = make_split(split, user_dense, columns[schema.TIMESTAMP], **split_args)
    for name, index in rows.items():
        if len(index) == 0:
            raise DataError(f"{source}: split '{name}' would be empty ({split_info})")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        with progress_bar(len(user_dense), desc=f"write {pathlib.Path(out).name}") as bar:
            return write_dataset(tmp, columns, rows, user_vocab=user_vocab, item_vocab=item_vocab,
                                 label_kind=label_kind, source=source, split_info=split_info,
                                 sparse_vocabs=sparse_vocabs, dense=list(dense), extra=extra,
                                 progress=bar)
