"""Criteo Kaggle / Terabyte TSV -> a prepared dataset, streaming in two passes.

Each line: label (0/1), 13 integer features I1..I13, 26 hex categorical features C1..C26, tab
separated, empty fields allowed (missing). Kaggle ships one `train.txt`; Terabyte ships
`day_0` .. `day_23` (optionally .gz). Rows are chronological, so the timestamp is the global
row index.

Criteo has no users or items; two categorical columns play those roles (`user_col`, `item_col`,
default C3 and C4, both large in Kaggle) and are written as user_id / item_id, the other 24
become sparse_<C> features.

Integer features: dense_<I> = log(1 + max(x, 0)) as float32, a missing value -> 0 (DLRM's usual
transform; negative values, which Criteo has in I2, clip to 0).

Categorical features -> dense ids by frequency, per column:
  - pass 1 counts every raw value over ALL rows of the input (train and validation alike, so
    the id map does not depend on the split);
  - id 0 is the single out-of-vocabulary id: every value seen fewer than `min_count` times
    (default 1: keep every value, so id 0 is then unused, train_count 0);
  - ids 1, 2, ... follow descending count, ties broken by the raw string (byte order), so the
    map is deterministic and independent of block sizes and file order within a count;
  - a missing (empty) field is its own value with raw_id "" (as DLRM's preprocessing treats it:
    missingness is informative). It is ranked and thresholded like any other value, so it goes
    to OOV only if it is rarer than `min_count`.
vocab/<entity>.parquet (users, items, sparse_<C>) holds id, raw_id (row 0: OOV_RAW_ID "<oov>"),
train_count (training rows with that id) and count (rows over all splits, the pass-1 count; for
id 0 the total of the values folded into it).

Pass 1 counts rows, checks labels and builds the vocabularies from per-block value counts merged
as it goes; pass 2 maps values to ids and writes the splits. Memory holds the vocabularies, not
the data. Splits: `temporal` by row index (the default, last 1/7 validates: Kaggle's seventh
day) or `random` by a seeded hash of the row index.

Malformed input is refused with file, 1-based line number and field: a line without exactly 40
tab-separated fields (an empty line included), a value in I1..I13 that is not an integer, a
label that is not 0 or 1 (or missing), a field that is not UTF-8. pyarrow only reports the block
of a parse error, so on that (error-only) path the block's lines are re-read in Python to name
the exact line; the normal path stays vectorised.
"""
from __future__ import annotations

import gzip
import io
import os
import pathlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data_pipeline import schema
from data_pipeline.dataset import (DatasetMeta, SplitWriter, atomic_output_dir, check_output,
                                   progress_bar, write_table)
from data_pipeline.errors import DataError

INT_COLUMNS = [f"I{i}" for i in range(1, 14)]
CAT_COLUMNS = [f"C{i}" for i in range(1, 27)]
NAMES = ["label", *INT_COLUMNS, *CAT_COLUMNS]
TYPES = {"label": pa.int64(), **{c: pa.int64() for c in INT_COLUMNS},
         **{c: pa.string() for c in CAT_COLUMNS}}
BLOCK_BYTES = 32 << 20
OOV_ID = 0
OOV_RAW_ID = "<oov>"
MISSING_RAW_ID = ""


def criteo_files(src: str | os.PathLike) -> list[pathlib.Path]:
    """The input files: the path itself, or train.txt / day_N[.gz] / *.tsv / *.txt in it."""
    src = pathlib.Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise DataError(f"{src}: no such file or directory")
    if (src / "train.txt").is_file():
        return [src / "train.txt"]
    days = [p for p in src.iterdir() if re.fullmatch(r"day_\d+(\.gz)?", p.name)]
    if days:
        return sorted(days, key=lambda p: int(re.search(r"\d+", p.name).group()))
    files = sorted(p for p in src.iterdir() if p.suffix in (".tsv", ".txt") and p.is_file())
    if not files:
        raise DataError(f"{src}: no Criteo files found (train.txt, day_N[.gz], *.tsv, *.txt)")
    return files


# ----------------------------------------------------------------------------- reading
def _batches(files: list[pathlib.Path], bar):
    """(file, first row of the batch within the file, batch) for every block of every file.
    Empty lines are kept as (all-null) rows, so row r of a file is its line r + 1."""
    for path in files:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: empty input (0 bytes)")
        stream = pa.input_stream(str(path), compression="gzip" if path.suffix == ".gz" else None)
        read_options = pacsv.ReadOptions(column_names=NAMES, block_size=BLOCK_BYTES)
        parse_options = pacsv.ParseOptions(delimiter="\t", quote_char=False,
                                           ignore_empty_lines=False)
        convert_options = pacsv.ConvertOptions(column_types=TYPES, strings_can_be_null=True,
                                                null_values=[""])
        row = 0
        try:
            reader = pacsv.open_csv(stream, read_options=read_options, parse_options=parse_options,
                                    convert_options=convert_options)
            position = 0
            for batch in reader:
                yield path, row, batch
                row += batch.num_rows
                now = stream.tell()
                bar.update(max(0, now - position))
                position = now
        except pa.ArrowInvalid as exc:
            located = locate_bad_line(path, row)
            if located is not None:
                raise DataError(located) from None
            raise DataError(f"{path}: {_explain(str(exc), row)}") from None
        finally:
            stream.close()


def _explain(message: str, row_offset: int) -> str:
    """Fallback when no line can be blamed: pyarrow's "In CSV column #3: ..." with names."""
    first = message.splitlines()[0]
    match = re.search(r"column #(\d+)", first)
    if match and int(match.group(1)) < len(NAMES):
        first = first.replace(match.group(0), f"column '{NAMES[int(match.group(1))]}'")
    return f"cannot parse ({first}; block starting at line {row_offset + 1})"


_INT_RE = re.compile(rb" *(-?[0-9]+|0[xX][0-9a-fA-F]+) *")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _int64(field: bytes) -> int | None:
    """The value of an integer as pyarrow's int64 parser accepts it (spaces trimmed, decimal or
    0x hex), or None if it refuses it."""
    match = _INT_RE.fullmatch(field)
    if match is None:
        return None
    text = match.group(1)
    if text[:2] in (b"0x", b"0X"):
        value = int(text, 16)
        return value if value < (1 << 64) else None
    value = int(text)
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def _show(field: bytes) -> str:
    return repr(field.decode("utf-8", errors="replace"))


def check_line(line: bytes) -> str | None:
    """Why one raw line (without its newline) is malformed, or None if it is fine."""
    fields = line.split(b"\t")
    if len(fields) != len(NAMES):
        what = "an empty line" if not line else f"{len(fields)} fields"
        return (f"expected {len(NAMES)} tab-separated fields (label, I1..I13, C1..C26), got "
                f"{what}")
    label = fields[0]
    if label == b"":
        return "field 'label': missing click label"
    if _int64(label) not in (0, 1):
        return f"field 'label': click label must be 0 or 1, got {_show(label)}"
    for name, field in zip(NAMES[1:], fields[1:]):
        if name.startswith("I"):
            if field != b"" and _int64(field) is None:
                return f"field '{name}': cannot parse {_show(field)} as integer"
        else:
            try:
                field.decode("utf-8")
            except UnicodeDecodeError:
                return f"field '{name}': not valid UTF-8 ({_show(field)})"
    return None


def _open_text(path: pathlib.Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _lines_from(f, skip: int):
    """Lines (bytes, newline stripped) of binary file `f` after its first `skip` lines; the
    skipping counts newlines chunk by chunk, so it runs at memory speed."""
    tail = b""
    remaining = skip
    while remaining:
        chunk = f.read(1 << 24)
        if not chunk:
            return
        newlines = chunk.count(b"\n")
        if newlines < remaining:
            remaining -= newlines
            continue
        pos = -1
        for _ in range(remaining):
            pos = chunk.index(b"\n", pos + 1)
        tail, remaining = chunk[pos + 1:], 0
    for line in io.BytesIO(tail + f.readline()):
        yield line.rstrip(b"\r\n")
    for line in f:
        yield line.rstrip(b"\r\n")


def locate_bad_line(path: pathlib.Path, first_row: int) -> str | None:
    """Error path only: "path:LINE: why" for the first malformed line at or after data row
    `first_row` (the start of the block pyarrow refused), or None if none is found."""
    with _open_text(path) as f:
        for number, line in enumerate(_lines_from(f, first_row), start=first_row + 1):
            why = check_line(line)
            if why is not None:
                return f"{path}:{number}: {why}"
    return None


def _check_labels(path, row, batch) -> None:
    """Labels of a parsed batch: present (an empty line parses as an all-null row) and 0/1."""
    label = batch.column("label")
    if label.null_count:
        i = int(np.flatnonzero(label.is_null().to_numpy(zero_copy_only=False))[0])
        located = locate_bad_line(path, row + i)        # an empty line, or an empty label
        raise DataError(located or f"{path}:{row + i + 1}: field 'label': missing click label")
    values = label.to_numpy()
    bad = np.flatnonzero((values != 0) & (values != 1))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}:{row + i + 1}: field 'label': click label must be 0 or 1, "
                        f"got {int(values[i])}")


# ----------------------------------------------------------------------------- vocabularies
class _ValueCounter:
    """Exact per-value counts of one column, merged from per-block value_counts; the merged
    table is re-aggregated whenever the pending parts outgrow it, so memory stays a small
    multiple of the vocabulary."""

    def __init__(self):
        self.parts: list[pa.Table] = []
        self.pending = 0
        self.merged = 0

    def add(self, values: pa.Array) -> None:
        vc = pc.value_counts(pc.fill_null(values, MISSING_RAW_ID))
        self.parts.append(pa.table({"value": vc.field("values"), "count": vc.field("counts")}))
        self.pending += len(vc)
        if self.pending > 2 * max(self.merged, 1 << 16):
            self._merge()

    def _merge(self) -> None:
        table = pa.concat_tables(self.parts).group_by("value").aggregate([("count", "sum")])
        table = pa.table({"value": table.column("value"), "count": table.column("count_sum")})
        self.parts = [table]
        self.pending = self.merged = table.num_rows

    def result(self) -> pa.Table:
        """(value, count) by descending count, ties by ascending raw string."""
        self._merge()
        table = self.parts.pop()
        order = pc.sort_indices(table, sort_keys=[("count", "descending"),
                                                  ("value", "ascending")])
        return table.take(order)


_NIBBLE = np.full(256, 255, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_NIBBLE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX_WIDTH = 15


def _hex_keys(values: pa.Array) -> np.ndarray | None:
    """Each string (lower-case hex, at most 15 characters; "" allowed) as a distinct uint64:
    its length in the top 4 bits, its value below. None if some string does not fit."""
    values = pc.fill_null(values, MISSING_RAW_ID)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    n = len(values)
    lengths = pc.binary_length(values).to_numpy(zero_copy_only=False).astype(np.uint64)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    if lengths.max() > _HEX_WIDTH:
        return None
    padded = pc.utf8_lpad(values, width=_HEX_WIDTH, padding="0")
    _, offsets_buf, data_buf = padded.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[padded.offset:padded.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]:offsets[-1]]
    nibbles = _NIBBLE[data.reshape(n, _HEX_WIDTH)]
    if (nibbles == 255).any():
        return None
    keys = lengths << np.uint64(60)
    for j in range(_HEX_WIDTH):
        keys |= nibbles[:, j].astype(np.uint64) << np.uint64(4 * (_HEX_WIDTH - 1 - j))
    return keys


class _IdMap:
    """raw value -> frequency id (1..len(kept)), anything else -> OOV_ID. Criteo's hex values
    use a sorted uint64 key array (binary search per block, no per-block hash build); other
    strings fall back to pyarrow's index_in."""

    def __init__(self, kept: pa.Array):
        self.kept = kept
        keys = _hex_keys(kept)
        if keys is not None and len(keys):
            order = np.argsort(keys, kind="stable")
            self.sorted_keys = keys[order]
            self.sorted_ids = (order + 1).astype(np.int64)
        else:
            self.sorted_keys = None

    def __call__(self, values: pa.Array) -> np.ndarray:
        if len(self.kept) == 0:
            return np.full(len(values), OOV_ID, dtype=np.int64)
        if self.sorted_keys is not None:
            keys = _hex_keys(values)
            if keys is not None:
                pos = np.minimum(np.searchsorted(self.sorted_keys, keys), len(self.sorted_keys) - 1)
                return np.where(self.sorted_keys[pos] == keys, self.sorted_ids[pos], OOV_ID)
        index = pc.index_in(pc.fill_null(values, MISSING_RAW_ID), value_set=self.kept)
        return pc.fill_null(index, -1).to_numpy(zero_copy_only=False).astype(np.int64) + 1


def _vocab_file(kept: pa.Array, kept_counts: np.ndarray, oov_count: int,
                train_count: np.ndarray) -> pa.Table:
    n = len(kept) + 1
    return pa.table({"id": pa.array(np.arange(n, dtype=np.int64)),
                     "raw_id": pa.concat_arrays([pa.array([OOV_RAW_ID], pa.string()),
                                                 kept.cast(pa.string())]),
                     "train_count": pa.array(train_count.astype(np.int64)),
                     "count": pa.array(np.concatenate([[oov_count], kept_counts]).astype(np.int64))})


# ----------------------------------------------------------------------------- conversion
def prepare_criteo(src: str | os.PathLike, out: str | os.PathLike, *, user_col: str = "C3",
                   item_col: str = "C4", min_count: int = 1, split: str = "temporal",
                   seed: int = 0, ratio: float = 0.8, cut: int | None = None,
                   cut_quantile: float | None = None, overwrite: bool = False) -> DatasetMeta:
    """Convert Criteo TSV file(s) with two streaming passes (see module docstring)."""
    check_output(out, overwrite)
    for role, column in (("user", user_col), ("item", item_col)):
        if column not in CAT_COLUMNS:
            raise DataError(f"--{role}-col must be one of C1..C26, got {column!r}")
    if user_col == item_col:
        raise DataError("--user-col and --item-col must differ")
    if int(min_count) < 1:
        raise DataError(f"--min-count must be >= 1, got {min_count}")
    min_count = int(min_count)
    if split not in ("temporal", "random"):
        raise DataError(f"criteo supports --split temporal|random (streaming), got {split!r}")
    if split == "temporal" and cut is None and cut_quantile is None:
        cut_quantile = 6 / 7
    files = criteo_files(src)
    total_bytes = sum(os.path.getsize(p) for p in files)

    # Pass 1: row count, label check, value counts over all rows.
    counters = {c: _ValueCounter() for c in CAT_COLUMNS}
    num_rows = 0
    with progress_bar(total_bytes, desc="criteo pass 1/2", unit="B") as bar:
        for path, row, batch in _batches(files, bar):
            _check_labels(path, row, batch)
            num_rows += batch.num_rows
            for c in CAT_COLUMNS:
                counters[c].add(batch.column(c))
    if num_rows == 0:
        raise DataError(f"{files[0]}: empty input (no data rows)")
    kept, kept_counts, oov_counts, id_maps = {}, {}, {}, {}
    for c in CAT_COLUMNS:
        table = counters.pop(c).result()
        counts = table.column("count").to_numpy()
        n_keep = int(np.searchsorted(-counts, -min_count, side="right"))   # counts descend
        kept[c] = table.column("value").slice(0, n_keep).combine_chunks()
        kept_counts[c] = counts[:n_keep]
        oov_counts[c] = int(counts[n_keep:].sum())
        id_maps[c] = _IdMap(kept[c])
    cardinality = {c: len(kept[c]) + 1 for c in CAT_COLUMNS}
    if split == "temporal":
        cut_row = int(cut if cut is not None else int(cut_quantile * num_rows))
        if not 0 < cut_row < num_rows:
            raise DataError(f"temporal cut at row {cut_row} leaves an empty split "
                            f"({num_rows} rows)")
        split_info = {"method": "temporal", "cut": cut, "cut_quantile": cut_quantile,
                      "cut_timestamp": cut_row}
    else:
        if not 0.0 < ratio < 1.0:
            raise DataError(f"--ratio must lie in (0, 1), got {ratio}")
        split_info = {"method": "random", "ratio": ratio, "seed": seed}

    # Pass 2: frequency ids, dense transform, splits.
    sparse_columns = [c for c in CAT_COLUMNS if c not in (user_col, item_col)]
    sparse_names = [schema.SPARSE_PREFIX + c for c in sparse_columns]
    dense_names = [schema.DENSE_PREFIX + c for c in INT_COLUMNS]
    arrow_schema = schema.arrow_schema(sparse_names, dense_names)
    train_counts = {c: np.zeros(cardinality[c], dtype=np.int64) for c in CAT_COLUMNS}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writers = {s: SplitWriter(tmp, s, arrow_schema) for s in ("train", "val")}
        global_row = 0
        with progress_bar(total_bytes, desc="criteo pass 2/2", unit="B") as bar:
            for _path, _row, batch in _batches(files, bar):
                n = batch.num_rows
                index = np.arange(global_row, global_row + n, dtype=np.int64)
                global_row += n
                ids = {c: id_maps[c](batch.column(c)) for c in CAT_COLUMNS}
                columns = {schema.USER: ids[user_col], schema.ITEM: ids[item_col],
                           schema.LABEL: batch.column("label").to_numpy().astype(np.float32),
                           schema.TIMESTAMP: index}
                for c, name in zip(sparse_columns, sparse_names):
                    columns[name] = ids[c]
                for c, name in zip(INT_COLUMNS, dense_names):
                    raw = pc.fill_null(batch.column(c), 0).to_numpy().astype(np.float64)
                    columns[name] = np.log1p(np.maximum(raw, 0.0)).astype(np.float32)
                if split == "temporal":
                    is_train = index < cut_row
                else:
                    is_train = _uniform_hash(index, seed) < ratio
                for c in CAT_COLUMNS:
                    train_counts[c] += np.bincount(ids[c][is_train], minlength=cardinality[c])
                for name, mask in (("train", is_train), ("val", ~is_train)):
                    if mask.any():
                        writers[name].write(pa.table({k: v[mask] for k, v in columns.items()}))
        splits = {name: w.close() for name, w in writers.items()}
        for name, rows in splits.items():
            if rows == 0:
                raise DataError(f"{files[0]}: split '{name}' would be empty ({split_info})")
        entities = {user_col: "users", item_col: "items", **dict(zip(sparse_columns, sparse_names))}
        for c, entity in entities.items():
            write_table(_vocab_file(kept[c], kept_counts[c], oov_counts[c], train_counts[c]),
                        tmp / "vocab" / f"{entity}.parquet")
        meta = DatasetMeta(num_users=cardinality[user_col], num_items=cardinality[item_col],
                           splits=splits, label_kind="click",
                           sparse_features={n: cardinality[c]
                                            for c, n in zip(sparse_columns, sparse_names)},
                           dense_features=dense_names,
                           source=f"criteo:{','.join(str(p) for p in files)}", split=split_info,
                           extra={"user_col": user_col, "item_col": item_col,
                                  "min_count": min_count, "oov_id": OOV_ID,
                                  "oov_raw_id": OOV_RAW_ID, "missing_raw_id": MISSING_RAW_ID,
                                  "id_order": "descending count over all rows, ties by raw id",
                                  "dense_transform": "log1p(max(x, 0)), missing -> 0"})
        (tmp / "meta.json").write_text(meta.to_json())
    return meta


def _uniform_hash(index: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (row index, seed) as uniforms in [0, 1): a per-row coin independent of
    how the input is chunked."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
