"""Top-K items for users, from a serving export.

    python -m trainer.recommend --export DIR --user 196 [--user 186 ...] --k 10
    python -m trainer.recommend --export DIR --users USERS.parquet|.csv --k 10 --out TOPK.parquet

Scores every item of the catalogue with the model (MF and two-tower as one matrix product per
item chunk, other user-item models pair by pair) and keeps the K best per user. `--exclude-train`
leaves out each user's training items (read from the training split of the dataset the run was
trained on). USERS needs a `user_id` column (or has one column); the output has user_id, rank,
item_id and score (the predicted rating, or click probability). A user outside the vocabulary
gets the new-entity user row (see trainer.export).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import pyarrow as pa

from trainer.serving import ServingModel, read_rows, write_rows


def training_pairs(model: ServingModel) -> tuple[np.ndarray, np.ndarray]:
    """(dense user ids, dense item ids) of the training split the export's run was trained on."""
    import pyarrow.dataset as ds
    train = pathlib.Path(model.manifest.get("data_dir", "")) / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{train}: the training split of the run's dataset is gone; "
                                f"--exclude-train needs it")
    t = ds.dataset(str(train), format="parquet").to_table(columns=["user_id", "item_id"])
    return t.column("user_id").to_numpy(), t.column("item_id").to_numpy()


def main(argv: list[str] | None = None) -> pa.Table:
    parser = argparse.ArgumentParser(prog="python -m trainer.recommend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="a directory written by trainer.export")
    parser.add_argument("--user", action="append", default=[], help="a raw user id (repeatable)")
    parser.add_argument("--users", help="Parquet or CSV of raw user ids")
    parser.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    parser.add_argument("--exclude-train", action="store_true",
                        help="leave out each user's training items")
    parser.add_argument("--out", help="write the top-K rows here (.parquet or .csv)")
    args = parser.parse_args(argv)
    model = ServingModel(args.export)
    users = list(args.user)
    if args.users:
        table = read_rows(args.users, id_columns=["user_id"])
        column = "user_id" if "user_id" in table.column_names else (
            table.column_names[0] if table.num_columns == 1 else None)
        if column is None:
            raise ValueError(f"{args.users}: no user_id column (columns {table.column_names})")
        users += [str(u) for u in table.column(column).to_pylist()]
    if not users:
        parser.error("give --user RAW_ID or --users FILE")
    exclude = training_pairs(model) if args.exclude_train else None
    items, scores = model.recommend(users, k=args.k, exclude=exclude)
    k = scores.shape[1]
    out = pa.table({"user_id": np.repeat(np.array(users, dtype=object), k).tolist(),
                    "rank": np.tile(np.arange(1, k + 1), len(users)),
                    "item_id": [i for row in items for i in row],
                    "score": scores.reshape(-1)})
    unknown = int((model.dense_ids("user_id", users) < 0).sum())
    if args.out:
        write_rows(out, args.out)
        print(f"[recommend] top-{k} for {len(users):,} users written to {args.out}"
              + (f" ({unknown} unknown: new-entity row)" if unknown else ""))
    else:
        what = "predicted rating" if model.manifest["loss"] == "mse" else "click probability"
        for u, row_items, row_scores in list(zip(users, items, scores))[:20]:
            known = "" if model.dense_ids("user_id", [u])[0] >= 0 else " (unknown: new-entity row)"
            print(f"user {u}{known}: top {k} by {what}")
            for rank, (i, s) in enumerate(zip(row_items, row_scores), 1):
                print(f"  {rank:>3}  item {i:<10} {s:.4f}")
        if len(users) > 20:
            print(f"... {len(users) - 20:,} more users (use --out FILE)")
    return out


if __name__ == "__main__":
    from data_pipeline.errors import DataError
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
