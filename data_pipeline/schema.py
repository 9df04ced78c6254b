"""The Parquet schema of a prepared split: one source of truth, validated on read.

Required columns: user_id:int64, item_id:int64 (dense ids), label:float32 (rating or 0/1 click),
timestamp:int64. Optional: any number of sparse_<name>:int64 (dense ids of an extra categorical
feature) and dense_<name>:float32 columns. No nulls anywhere; ids are >= 0; labels and dense
values are finite.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from data_pipeline.errors import DataError

USER = "user_id"
ITEM = "item_id"
LABEL = "label"
TIMESTAMP = "timestamp"
SPARSE_PREFIX = "sparse_"
DENSE_PREFIX = "dense_"

REQUIRED: dict[str, pa.DataType] = {USER: pa.int64(), ITEM: pa.int64(), LABEL: pa.float32(),
                                    TIMESTAMP: pa.int64()}
ID_COLUMNS = (USER, ITEM)


def arrow_schema(sparse: Sequence[str] = (), dense: Sequence[str] = ()) -> pa.Schema:
    """The schema of a split with the given extra columns (full names: sparse_x, dense_y)."""
    fields = [pa.field(name, dtype, nullable=False) for name, dtype in REQUIRED.items()]
    fields += [pa.field(name, pa.int64(), nullable=False) for name in sparse]
    fields += [pa.field(name, pa.float32(), nullable=False) for name in dense]
    return pa.schema(fields)


def numpy_dtype(column: str) -> np.dtype:
    """The numpy dtype a reader yields for `column`."""
    if column in REQUIRED:
        return np.dtype(REQUIRED[column].to_pandas_dtype())
    if column.startswith(SPARSE_PREFIX):
        return np.dtype(np.int64)
    if column.startswith(DENSE_PREFIX):
        return np.dtype(np.float32)
    raise KeyError(column)


def validate_schema(schema: pa.Schema, where: str) -> tuple[list[str], list[str]]:
    """Check a file's schema; return its (sparse, dense) column names in file order."""
    names = schema.names
    for name, dtype in REQUIRED.items():
        if name not in names:
            raise DataError(f"{where}: missing column '{name}' (columns: {', '.join(names)})")
        if schema.field(name).type != dtype:
            raise DataError(f"{where}: column '{name}' has type {schema.field(name).type}, "
                            f"expected {dtype}")
    sparse, dense = [], []
    for field in schema:
        if field.name in REQUIRED:
            continue
        if field.name.startswith(SPARSE_PREFIX):
            expected, bucket = pa.int64(), sparse
        elif field.name.startswith(DENSE_PREFIX):
            expected, bucket = pa.float32(), dense
        else:
            raise DataError(f"{where}: unexpected column '{field.name}' (allowed: "
                            f"{', '.join(REQUIRED)}, {SPARSE_PREFIX}*, {DENSE_PREFIX}*)")
        if field.type != expected:
            raise DataError(f"{where}: column '{field.name}' has type {field.type}, "
                            f"expected {expected}")
        bucket.append(field.name)
    return sparse, dense


def validate_values(columns: Mapping[str, np.ndarray], where: str, row_offset: int = 0) -> None:
    """Vectorised value checks on a batch: ids >= 0, labels/dense finite. `row_offset` is the
    batch's first row within `where`, so the message names the file's row."""
    for name, values in columns.items():
        if name in ID_COLUMNS or name == TIMESTAMP or name.startswith(SPARSE_PREFIX):
            if name == TIMESTAMP:
                continue
            bad = np.flatnonzero(values < 0)
            what = "negative id"
        elif name == LABEL or name.startswith(DENSE_PREFIX):
            bad = np.flatnonzero(~np.isfinite(values))
            what = "non-finite value"
        else:
            continue
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{where}: column '{name}' row {row_offset + i}: {what} "
                            f"{values[i].item()!r} ({bad.size} such rows)")


def table_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """Columns of an Arrow table as contiguous numpy arrays in the schema's dtypes."""
    out = {}
    for name in table.column_names:
        column = table.column(name)
        if column.null_count:
            raise DataError(f"column '{name}' has {column.null_count} nulls")
        out[name] = np.ascontiguousarray(column.to_numpy(), dtype=numpy_dtype(name))
    return out
