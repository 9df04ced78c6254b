"""Scoring from a serving export (`trainer.export`): raw ids in, the trained model's scores out,
without the checkpoint, TorchRec sharding or a process group.

    from trainer.serving import ServingModel
    model = ServingModel("exports/ml100k_mf")
    model.predict({"user_id": ["196", "186"], "item_id": ["242", "302"]})   # [2] scores
    items, scores = model.recommend(["196"], k=10)                          # top-10 per user

Raw ids are matched to the vocabularies as strings (a CSV's 196 and a Parquet's "196" are the
same id); an id outside a vocabulary gets its table's unknown row (a clustered table's
new-entity cluster), never an error. Lookups are vectorised gathers; `recommend` scores the whole
catalogue in item chunks with a running top-K, so no `[users x items]` matrix is held.
"""
from __future__ import annotations

import json
import pathlib
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from trainer.export import FORMAT, VERSION

USER, ITEM = "user_id", "item_id"
PAIR_BUDGET = 1 << 22            # scores computed at once by recommend (users x item chunk)


def lookup_rows(spec: dict, arrays: Mapping[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Rows `[n, D]` of dense ids `ids` (all in the vocabulary) of one exported table: what the
    training collection's lookup gives for one id per bag."""
    ids = ids.long()
    kind = spec["kind"]
    if kind == "clustered":
        rows = arrays["clusters"][arrays["assignment"][ids].long()]
        if "entity_bias" in arrays:
            rows = rows.clone()
            rows[:, spec["bias_column"]] += arrays["entity_bias"][ids]
        return rows
    if kind == "full":
        return arrays["weight"][ids]
    if kind == "hash":
        from cel_torchrec.modules.baselines import hash_ids
        return arrays["weight"][hash_ids(ids, spec["buckets"], spec["salt"])]
    if kind == "qr":
        m = spec["collisions"]
        q, r = arrays["quotient"][ids // m], arrays["remainder"][ids % m]
        return q * r if spec["combine"] == "mult" else q + r
    if kind in ("sparse", "cce", "cerp"):
        from cel_torchrec.modules.compact import lookup_exported
        return lookup_exported(spec, arrays, ids)
    raise ValueError(f"unknown table kind {kind!r} in the export")


class ServingModel:
    """A loaded serving export: `dense_ids`, `embed`, `predict`, `recommend`."""

    def __init__(self, directory: str | pathlib.Path):
        from trainer.config import ModelConfig
        from trainer.models import build_model

        self.directory = pathlib.Path(directory)
        path = self.directory / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"{self.directory}: not a serving export (no manifest.json); "
                                    f"write one with `python -m trainer.export --run RUN_DIR "
                                    f"--out DIR`")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r} version "
                             f"{self.manifest.get('version')!r}; this code reads {FORMAT!r} "
                             f"version {VERSION}")
        self.features: dict[str, dict] = self.manifest["features"]
        self.arrays = {f: {name: torch.from_numpy(np.load(self.directory / rel))
                           for name, rel in spec["files"].items()}
                       for f, spec in self.features.items()}
        self._vocab: dict[str, pa.Array] = {}
        self._raw: dict[str, pa.Array] = {}
        m = self.manifest["model"]
        ctr = [f for f in self.features] if m["name"] in ("dlrm", "deepfm") else None
        self.dense_features: list[str] = list(self.manifest.get("dense_features", []))
        self.model = build_model(ModelConfig(**m), num_dense=len(self.dense_features), features=ctr)
        self.model.load_state_dict(torch.load(self.directory / "model.pt", weights_only=True))
        self.model.eval()

    # ------------------------------------------------------------------ ids
    def vocabulary(self, feature: str) -> pa.Array:
        """The raw ids of `feature`'s entities as strings, indexed by dense id."""
        if feature not in self._raw:
            if feature not in self.features:
                raise KeyError(f"unknown feature {feature!r}; the export has {list(self.features)}")
            table = pq.read_table(self.directory / self.features[feature]["vocab"],
                                  columns=["id", "raw_id"])
            order = np.argsort(table.column("id").to_numpy())
            self._raw[feature] = pc.cast(table.column("raw_id").combine_chunks(),
                                         pa.string()).take(pa.array(order))
        return self._raw[feature]

    def dense_ids(self, feature: str, raw_ids: Sequence | np.ndarray | pa.Array) -> np.ndarray:
        """Dense ids (int64) of raw ids; -1 for an id outside the vocabulary."""
        raw = raw_ids if isinstance(raw_ids, (pa.Array, pa.ChunkedArray)) else pa.array(
            [str(r) for r in raw_ids] if not isinstance(raw_ids, np.ndarray) else raw_ids)
        raw = pc.cast(raw, pa.string())
        index = pc.index_in(raw, value_set=self.vocabulary(feature))
        return np.asarray(index.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)

    # ------------------------------------------------------------------ rows and scores
    def embed(self, feature: str, dense_ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Rows `[n, D]` of dense ids (-1: the table's unknown row)."""
        ids = torch.as_tensor(np.asarray(dense_ids), dtype=torch.long)
        spec, arrays = self.features[feature], self.arrays[feature]
        known = ids >= 0
        if bool(known.all()):
            return lookup_rows(spec, arrays, ids)
        out = arrays["unknown"].expand(ids.numel(), -1).clone()
        out[known] = lookup_rows(spec, arrays, ids[known])
        return out

    @torch.no_grad()
    def score_dense(self, ids: Mapping[str, np.ndarray], dense: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The model's output (a rating, or a click logit) for samples given by dense ids per
        feature (every feature of the export)."""
        missing = [f for f in self.features if f not in ids]
        if missing:
            raise ValueError(f"scoring needs every feature of the export; missing {missing}")
        embs = {f: self.embed(f, ids[f]) for f in self.features}
        return self.model(embs, dense)

    def predict(self, columns: Mapping[str, Sequence]) -> np.ndarray:
        """Scores of samples given by raw ids per feature (and the dense feature columns a CTR
        model reads): the rating for an MSE model, the click probability for a BCE one."""
        ids = {f: self.dense_ids(f, columns[f]) for f in self.features if f in columns}
        dense = None
        if self.dense_features:
            missing = [c for c in self.dense_features if c not in columns]
            if missing:
                raise ValueError(f"the model reads dense features; missing columns {missing}")
            dense = torch.tensor(np.stack([np.asarray(columns[c], dtype=np.float32)
                                           for c in self.dense_features], axis=1))
        out = self.score_dense(ids, dense)
        if self.manifest["loss"] == "bce":
            out = torch.sigmoid(out)
        return out.numpy()

    @torch.no_grad()
    def recommend(self, users: Sequence, k: int = 10,
                  exclude: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> tuple[list[list[str]], np.ndarray]:
        """Top-`k` items by the model's score for each raw user id: (raw item ids per user,
        scores `[U, k]`). `exclude`: (dense user ids, dense item ids) pairs never recommended
        (e.g. the training interactions)."""
        if set(self.features) != {USER, ITEM} or self.dense_features:
            raise ValueError("recommend scores users against items: the export's model reads "
                             f"{list(self.features)} (and dense {self.dense_features})")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        num_items = self.features[ITEM]["num_entities"]
        k = min(k, num_items)
        uniq, inverse = np.unique(self.dense_ids(USER, users), return_inverse=True)
        u = self.embed(USER, uniq)
        n = len(uniq)
        pair_rows = pair_items = None
        if exclude is not None:
            ex_u, ex_i = (np.asarray(a, dtype=np.int64) for a in exclude)
            pos = np.searchsorted(uniq, ex_u).clip(0, max(n - 1, 0))
            hit = (uniq[pos] == ex_u) & (ex_u >= 0) & (ex_i >= 0) if n else np.zeros(0, bool)
            pair_rows, pair_items = torch.from_numpy(pos[hit]), torch.from_numpy(ex_i[hit])
        chunk = max(1, min(num_items, PAIR_BUDGET // max(n, 1)))
        best_s = torch.full((n, k), -torch.inf)
        best_i = torch.zeros((n, k), dtype=torch.long)
        for start in range(0, num_items, chunk):        # over item chunks, vectorised within
            items = torch.arange(start, min(num_items, start + chunk))
            s = self._score_block(u, self.embed(ITEM, items))
            if pair_rows is not None:
                sel = (pair_items >= start) & (pair_items < start + len(items))
                s[pair_rows[sel], pair_items[sel] - start] = -torch.inf
            both_s = torch.cat([best_s, s], dim=1)
            both_i = torch.cat([best_i, items.expand(n, -1)], dim=1)
            best_s, pos_k = both_s.topk(k, dim=1)
            best_i = both_i.gather(1, pos_k)
        best_s, best_i = best_s[inverse], best_i[inverse]
        raw = self.vocabulary(ITEM).take(pa.array(best_i.reshape(-1).numpy())).to_pylist()
        if self.manifest["loss"] == "bce":
            best_s = torch.sigmoid(best_s)
        return [raw[r * k:(r + 1) * k] for r in range(len(inverse))], best_s.numpy()

    def _score_block(self, u: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """`[U, I]` scores: the model's matrix form where it has one (MF, two-tower), else its
        forward over every pair of the block."""
        if hasattr(self.model, "score_matrix"):
            return self.model.score_matrix(u, items)
        nu, ni = u.shape[0], items.shape[0]
        embs = {USER: u.repeat_interleave(ni, dim=0), ITEM: items.repeat(nu, 1)}
        return self.model(embs, None).reshape(nu, ni)


# ----------------------------------------------------------------------------- files
def read_rows(path: str | pathlib.Path, id_columns: Sequence[str] = ()) -> pa.Table:
    """A Parquet or CSV file (by suffix) as an Arrow table; in a CSV the `id_columns` are read
    as strings, so raw ids such as "007" keep their spelling."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        import pyarrow.csv as pacsv
        parse = pacsv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in id_columns})
        return pacsv.read_csv(path, parse_options=parse, convert_options=convert)
    return pq.read_table(path)


def write_rows(table: pa.Table, path: str | pathlib.Path) -> None:
    """Write `table` as Parquet, or CSV for a .csv suffix."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        import pyarrow.csv as pacsv
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
