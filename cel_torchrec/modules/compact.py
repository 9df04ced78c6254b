"""Compact embeddings from the literature, behind the baselines' interface (KJT in, KeyedTensor
out, `embedding_bytes()`), written from the papers' descriptions:

- `SparseEmbeddingBagCollection`: rows kept sparse, the top-k magnitudes of each row (the
  compressed-ELSA manner), stored as k values and k column indices per row.
- `CCEEmbeddingBagCollection`: CCE (Tsang & Ahle, "Clustering the Sketch", NeurIPS 2023).
- `CERPEmbeddingBagCollection`: CERP (Liang et al., ICDM 2023).

Every collection's `embedding_bytes()` counts what its serving export stores: values, column
indices, row pointers and assignment maps included (`export_table` writes exactly those arrays;
the tests check the two agree). Tables left out of a method's shape dict stay full. Each id
feature must be looked up one id per bag (user / item / categorical features are).

Hooks the training loop calls when a collection has them: `after_init()` once the tables are
initialised, `after_step(step)` after each optimizer step, `after_epoch(epoch, epochs,
optimizer)` at each epoch end (the CCE clustering), `penalty()` a loss term of the last
training batch (CERP's regulariser)."""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

VALUE_BYTES = 4                      # float32 values
MAP_BYTES = 4                        # int32 assignment maps (as CEL's)
ROWPTR_BYTES = 4                     # int32 CSR row pointers
BLOCK = 1 << 16                      # ids per block in the CCE clustering pass


def index_bytes(dim: int) -> int:
    """Bytes of one column index of a `dim`-wide row: uint8 up to 256 columns, else int16."""
    return 1 if dim <= 256 else 2


def _index_dtype(dim: int):
    import numpy as np
    return np.uint8 if dim <= 256 else np.int16


def salted_hash(ids: torch.Tensor, buckets: int, salt: int | torch.Tensor) -> torch.Tensor:
    """A salted multiplicative hash of int64 ids into `[0, buckets)`: different salts give
    unrelated functions (not shifts of one another). int64 products wrap, as intended."""
    x = ids.long() * 0x1E3779B97F4A7C15 + torch.as_tensor(salt, dtype=torch.long) * 0x3C6EF372FE94F82B
    x = x ^ (x >> 31)
    x = x * 0x5851F42D4C957F2D
    x = x ^ (x >> 29)
    return torch.remainder(x, buckets)


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 at the `k` largest magnitudes of each row of `x`, 0.0 elsewhere."""
    if k >= x.shape[1]:
        return torch.ones_like(x)
    idx = x.detach().abs().topk(k, dim=1).indices
    return torch.zeros_like(x).scatter_(1, idx, 1.0)


def straight_through(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x * mask` forward; the gradient reaches every entry of `x` (straight-through), so a
    pruned entry whose gradient keeps pushing it up can grow back into the kept set."""
    return x + (x * mask - x).detach()


def _pool(rows: torch.Tensor, lengths: torch.Tensor, bags: int) -> torch.Tensor:
    """Sum-pool `rows` (one per id) into `bags` bags of `lengths` ids (EBC's SUM pooling)."""
    bag = torch.repeat_interleave(torch.arange(bags, device=rows.device), lengths.long())
    return torch.zeros(bags, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, bag, rows)


def _config_bytes(t: EmbeddingBagConfig) -> int:
    return t.num_embeddings * t.embedding_dim * VALUE_BYTES


# --------------------------------------------------------------------------- sizing by budget
def sparse_k_for(dim: int, ratio: float) -> int:
    """Non-zeros per row that bring a `dim`-wide float32 row to 1/ratio of its bytes."""
    k = int(dim * VALUE_BYTES / ratio // (VALUE_BYTES + index_bytes(dim)))
    if k < 1:
        raise ValueError(f"embedding.compression={ratio:g} is out of the sparse method's reach for "
                         f"{dim}-wide rows: one value and its index per row is "
                         f"1/{dim * VALUE_BYTES / (VALUE_BYTES + index_bytes(dim)):.1f} of a row")
    return min(k, dim)


def cce_shape_for(n: int, dim: int, ratio: float, chunks: int) -> tuple[int, int]:
    """(column chunks, rows per table) of CCE within 1/ratio of a full table's bytes: per chunk
    two tables of b rows and one int32 map of n ids. Chunks halve from `chunks` until b >= 1."""
    budget = n * dim * VALUE_BYTES / ratio
    c = max(1, min(int(chunks), dim))
    while True:
        b = int((budget - c * n * MAP_BYTES) // (2 * dim * VALUE_BYTES))
        if b >= 1 or c == 1:
            break
        c = max(1, c // 2)
    if b < 1:
        raise ValueError(f"embedding.compression={ratio:g} is out of CCE's reach: its int32 map "
                         f"alone is 1/{dim} of the full table's bytes")
    return c, min(b, n)


def cerp_shape_for(n: int, dim: int, ratio: float, dense_factor: float) -> tuple[int, int]:
    """(collisions m, non-zeros) of CERP within 1/ratio of a full table's bytes: two meta tables
    (m remainder rows, ceil(n/m) quotient rows) of about `dense_factor` times the budget's rows
    before pruning, stored as CSR (values, column indices, int32 row pointers)."""
    budget = n * dim * VALUE_BYTES / ratio
    per_nnz = VALUE_BYTES + index_bytes(dim)
    m = qr_collisions_for(n, max(dense_factor, 1.0) * budget / (dim * per_nnz))
    rows = m + -(-n // m)
    nnz = int((budget - (rows + 2) * ROWPTR_BYTES) // per_nnz)
    if nnz < 1:
        raise ValueError(f"embedding.compression={ratio:g} is out of CERP's reach: the row "
                         f"pointers of its {rows} meta rows alone exceed the budget")
    return m, min(nnz, rows * dim)


def qr_collisions_for(n: int, budget_rows: float) -> int:
    """The QR collision count `m` whose two tables (`ceil(n / m) + m` rows) fit `budget_rows`
    with the largest quotient table; where no `m` fits (the fewest rows QR can have is about
    `2 sqrt(n)`), the `m` with the fewest rows."""
    root = math.isqrt(max(n - 1, 0)) + 1                 # ceil(sqrt(n)): the fewest rows
    if budget_rows * budget_rows < 4 * n:
        return max(1, root)
    m = max(1, int((budget_rows - math.sqrt(budget_rows * budget_rows - 4 * n)) / 2))
    while m < root and -(-n // m) + m > budget_rows:    # a few steps at most
        m += 1
    return m


# --------------------------------------------------------------------------- sparse rows
class SparseEmbeddingBagCollection(nn.Module):
    """Top-k sparse rows: table `t` in `nonzeros` keeps the `nonzeros[t]` largest magnitudes of
    each row and zeroes the rest, in training (straight-through, so the kept set can change) and
    in serving (k values + k column indices per row). The tables are a stock EBC inside, so
    TorchRec's DMP shards them and FBGEMM's fused optimizer updates them; the mask is applied
    to the pooled rows, exact for one id per bag."""

    def __init__(self, tables: list[EmbeddingBagConfig], nonzeros: Mapping[str, int],
                 device: torch.device | None = None):
        super().__init__()
        self._tables = list(tables)
        self._nonzeros = {t: int(k) for t, k in nonzeros.items()}
        for t in tables:
            if t.name in self._nonzeros and not 1 <= self._nonzeros[t.name] <= t.embedding_dim:
                raise ValueError(f"sparse table {t.name!r}: non-zeros per row must be in "
                                 f"[1, {t.embedding_dim}], got {self._nonzeros[t.name]}")
        self._k_of_feature = {f: self._nonzeros[t.name] for t in tables if t.name in self._nonzeros
                              for f in t.feature_names}
        self._embedding_bag_collection = EmbeddingBagCollection(tables=tables, device=device)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        looked_up = self._embedding_bag_collection(features)
        if not self._k_of_feature:
            return looked_up
        parts = looked_up.to_dict()
        values = [straight_through(v, topk_mask(v, self._k_of_feature[f]))
                  if f in self._k_of_feature else v for f, v in parts.items()]
        return KeyedTensor(keys=list(parts), length_per_key=[v.shape[1] for v in values],
                           values=torch.cat(values, dim=1))

    def embedding_bytes(self) -> int:
        total = 0
        for t in self._tables:
            k = self._nonzeros.get(t.name)
            total += (_config_bytes(t) if k is None else
                      t.num_embeddings * k * (VALUE_BYTES + index_bytes(t.embedding_dim)))
        return total

    def compressed_tables(self) -> list[str]:
        return list(self._nonzeros)

    @torch.no_grad()
    def export_table(self, table: str) -> tuple[dict, dict]:
        """(spec, numpy arrays) of a sparse table: values `[n, k]` and column indices `[n, k]`."""
        weight = self._embedding_bag_collection.embedding_bags[table].weight.detach().cpu()
        k = self._nonzeros[table]
        idx = weight.abs().topk(k, dim=1).indices.sort(dim=1).values
        values = weight.gather(1, idx)
        return ({"kind": "sparse", "dim": int(weight.shape[1]), "nonzeros": k},
                {"values": values.numpy(), "indices": idx.numpy().astype(_index_dtype(weight.shape[1]))})


class _ComposedCollection(nn.Module):
    """Shared shape of CCE and CERP: each id feature's rows come from `rows(table, ids)`, then
    sum-pooled per bag (one id per bag for user / item / categorical features)."""

    _feature_table: dict

    def rows(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        out = [_pool(self.rows(self._feature_table[key], jt.values()), jt.lengths(), features.stride())
               for key, jt in features.to_dict().items()]
        return KeyedTensor(keys=features.keys(), length_per_key=[v.shape[1] for v in out],
                           values=torch.cat(out, dim=1))


# --------------------------------------------------------------------------- CCE
@dataclasses.dataclass(frozen=True)
class CCEShape:
    """One CCE table: `chunks` column chunks, each with two tables of `rows` rows."""

    chunks: int
    rows: int


class CCEEmbeddingBagCollection(_ComposedCollection):
    """CCE (Tsang & Ahle 2023). A table's columns are split into `chunks`; chunk c has two small
    tables T1_c, T2_c of `rows` rows, and an id's chunk vector is T1_c[h1_c(id)] + T2_c[h2_c(id)].
    h1_c starts as a hash and is stored as an int32 map; h2_c is a salted hash (its salt is all
    it stores). At each epoch end until `until` of training (`after_epoch`), per chunk: k-means
    (`kmeans_iters` Lloyd steps, `rows` centroids) over the current vectors of a sample of
    `sample_per_row * rows` ids; every id's h1_c becomes its nearest centroid and T1_c the
    centroids; a fresh salt is drawn for h2_c and T2_c set to the mean residual (vector minus
    its centroid) of the ids hashed to each row. The optimizer's state of the two tables is
    reset (its moments belong to the old rows).

    Cost of one clustering: every id's vector against every centroid, `n * rows * dim` flops,
    in blocks of `BLOCK` ids (no [ids x rows] matrix); the tables are plain parameters updated
    by the torch optimizer, on one process."""

    def __init__(self, tables: list[EmbeddingBagConfig], shapes: Mapping[str, CCEShape],
                 until: float = 0.75, kmeans_iters: int = 10, sample_per_row: int = 256,
                 seed: int = 0, device: torch.device | None = None):
        super().__init__()
        self._tables = {t.name: t for t in tables}
        self._shapes = dict(shapes)
        self._feature_table = {f: t.name for t in tables for f in t.feature_names}
        self.until, self.kmeans_iters, self.sample_per_row = float(until), int(kmeans_iters), int(sample_per_row)
        self._generator = torch.Generator().manual_seed(seed + 17)
        self.params = nn.ParameterDict()
        for t in tables:
            shape = self._shapes.get(t.name)
            if shape is None:
                self.params[t.name] = nn.Parameter(torch.empty(t.num_embeddings, t.embedding_dim, device=device))
                continue
            if not 1 <= shape.chunks <= t.embedding_dim or shape.rows < 1:
                raise ValueError(f"CCE table {t.name!r}: chunks must be in [1, dim] and rows >= 1, "
                                 f"got {shape}")
            ids = torch.arange(t.num_embeddings, device=device)
            maps = []
            for c, width in enumerate(self.chunk_widths(t.name)):
                self.params[f"{t.name}__cce{c}_a"] = nn.Parameter(torch.empty(shape.rows, width, device=device))
                self.params[f"{t.name}__cce{c}_b"] = nn.Parameter(torch.empty(shape.rows, width, device=device))
                maps.append(salted_hash(ids, shape.rows, 2 * c).to(torch.int32))
            self.register_buffer(f"{t.name}__map", torch.stack(maps))
            self.register_buffer(f"{t.name}__salts",
                                 torch.arange(shape.chunks, dtype=torch.long, device=device) * 2 + 1)
            self.register_buffer(f"{t.name}__clusterings", torch.zeros((), dtype=torch.long, device=device))

    def chunk_widths(self, table: str) -> list[int]:
        d, c = self._tables[table].embedding_dim, self._shapes[table].chunks
        return [d // c + (1 if i < d % c else 0) for i in range(c)]

    def compressed_tables(self) -> list[str]:
        return list(self._shapes)

    def rows(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """The composed rows `[len(ids), dim]` of `ids`."""
        if table not in self._shapes:
            return self.params[table][ids]
        ids = ids.long()
        maps, salts = getattr(self, f"{table}__map"), getattr(self, f"{table}__salts")
        rows = self._shapes[table].rows
        return torch.cat([self.params[f"{table}__cce{c}_a"][maps[c][ids].long()]
                          + self.params[f"{table}__cce{c}_b"][salted_hash(ids, rows, salts[c])]
                          for c in range(self._shapes[table].chunks)], dim=1)

    def embedding_bytes(self) -> int:
        total = 0
        for name, t in self._tables.items():
            s = self._shapes.get(name)
            total += (_config_bytes(t) if s is None else
                      2 * s.rows * t.embedding_dim * VALUE_BYTES + s.chunks * t.num_embeddings * MAP_BYTES)
        return total

    @torch.no_grad()
    def after_epoch(self, epoch: int, epochs: int, optimizer=None) -> dict | None:
        """The clustering step after epoch `epoch` (1-based) of `epochs`, while
        `epoch / epochs <= until`; returns what it did, or None."""
        if not self._shapes or epoch > self.until * epochs:
            return None
        report = {}
        for table in self._shapes:
            report[table] = self._cluster_table(table)
            if optimizer is not None:
                for c in range(self._shapes[table].chunks):
                    for part in "ab":
                        optimizer.state.pop(self.params[f"{table}__cce{c}_{part}"], None)
        return report

    def _cluster_table(self, table: str) -> dict:
        n, rows = self._tables[table].num_embeddings, self._shapes[table].rows
        maps, salts = getattr(self, f"{table}__map"), getattr(self, f"{table}__salts")
        g = self._generator
        inertia = 0.0
        for c in range(self._shapes[table].chunks):
            t1, t2 = self.params[f"{table}__cce{c}_a"], self.params[f"{table}__cce{c}_b"]
            dev = t1.device

            def vectors(ids, c=c, t1=t1, t2=t2):
                return t1[maps[c][ids].long()] + t2[salted_hash(ids, rows, salts[c])]

            sample = torch.randint(n, (min(n, self.sample_per_row * rows),), generator=g).to(dev)
            centroids = kmeans(vectors(sample), rows, self.kmeans_iters, g)
            new_salt = int(torch.randint(1 << 40, (1,), generator=g))
            sums = torch.zeros_like(t2)
            counts = torch.zeros(rows, dtype=t2.dtype, device=dev)
            for start in range(0, n, BLOCK):             # blocks of ids, not one id at a time
                ids = torch.arange(start, min(n, start + BLOCK), device=dev)
                v = vectors(ids)
                near, dist = nearest(v, centroids)
                inertia += float(dist.sum())
                bucket = salted_hash(ids, rows, new_salt)
                sums.index_add_(0, bucket, v - centroids[near])
                counts.index_add_(0, bucket, torch.ones_like(bucket, dtype=t2.dtype))
                maps[c][start:start + ids.numel()] = near.to(torch.int32)
            t1.copy_(centroids)
            t2.copy_(sums / counts.clamp_min(1).unsqueeze(1))
            salts[c] = new_salt
        getattr(self, f"{table}__clusterings").add_(1)
        return {"inertia": inertia / n, "clusterings": int(getattr(self, f"{table}__clusterings"))}

    @torch.no_grad()
    def export_table(self, table: str) -> tuple[dict, dict]:
        s = self._shapes[table]
        maps, salts = getattr(self, f"{table}__map"), getattr(self, f"{table}__salts")
        arrays = {"map": maps.cpu().numpy()}
        for c in range(s.chunks):
            arrays[f"first_{c}"] = self.params[f"{table}__cce{c}_a"].detach().cpu().numpy()
            arrays[f"second_{c}"] = self.params[f"{table}__cce{c}_b"].detach().cpu().numpy()
        return ({"kind": "cce", "chunks": s.chunks, "rows": s.rows,
                 "salts": [int(x) for x in salts.cpu()]}, arrays)


def nearest(x: torch.Tensor, centroids: torch.Tensor, block: int = 1 << 14):
    """(index, squared distance) of each row of `x`'s nearest centroid, in blocks of rows."""
    c2 = (centroids * centroids).sum(1)
    idx, dist = [], []
    for start in range(0, x.shape[0], block):
        xb = x[start:start + block]
        d = c2.unsqueeze(0) - 2 * xb @ centroids.T
        best, arg = d.min(1)
        idx.append(arg)
        dist.append((best + (xb * xb).sum(1)).clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means: `k` centroids of the rows of `x`, seeded with distinct random rows (with
    repetition where `x` has fewer rows); an emptied centroid keeps its place."""
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    seeds = perm[torch.arange(k, device=x.device) % x.shape[0]]
    centroids = x[seeds].clone()
    for _ in range(iters):
        near, _ = nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, near, x)
        counts = torch.bincount(near, minlength=k).to(x.dtype).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids


# --------------------------------------------------------------------------- CERP
@dataclasses.dataclass(frozen=True)
class CERPShape:
    """One CERP table: `collisions` m (remainder rows; ceil(n/m) quotient rows) and the number
    of non-zeros the two pruned meta tables keep."""

    collisions: int
    nonzeros: int


class CERPEmbeddingBagCollection(_ComposedCollection):
    """CERP (Liang et al. 2023): an id's row is P'[id % m] + Q'[id // m], the sum of two meta
    tables, each pruned by a learnable soft threshold W' = sign(W) * relu(|W| - sigmoid(S) * g)
    (S per table and column, starting at `threshold_init`; g = `threshold_scale`), with a
    regulariser `reg * sum_j |P'_j| |Q'_j|` over the batch's ids that pushes the two tables'
    non-zeros of an id to complementary columns.

    The budget is counted in non-zeros (CSR: values, column indices, row pointers): on top of
    the soft threshold a hard mask keeps the `nonzeros` largest |W'| over both tables,
    recomputed every `refresh_every` steps and at each epoch end (so evaluation and export are
    always within budget), applied straight-through so pruned entries can grow back. The paper
    reaches its target sparsity by tuning the threshold; the hard mask is this implementation's
    way of holding one budget for every run. Per step the work is the batch's rows; a refresh
    is one top-k over the meta tables (about `dense_factor` x the budget)."""

    def __init__(self, tables: list[EmbeddingBagConfig], shapes: Mapping[str, CERPShape],
                 reg: float = 1e-3, refresh_every: int = 100, threshold_init: float = -10.0,
                 threshold_scale: float = 1.0, device: torch.device | None = None):
        super().__init__()
        self._tables = {t.name: t for t in tables}
        self._shapes = dict(shapes)
        self._feature_table = {f: t.name for t in tables for f in t.feature_names}
        self.reg, self.refresh_every = float(reg), int(refresh_every)
        self.threshold_init, self.threshold_scale = float(threshold_init), float(threshold_scale)
        self.params = nn.ParameterDict()
        self._penalty = None
        for t in tables:
            s = self._shapes.get(t.name)
            if s is None:
                self.params[t.name] = nn.Parameter(torch.empty(t.num_embeddings, t.embedding_dim, device=device))
                continue
            m = s.collisions
            q_rows = -(-t.num_embeddings // m)
            if m < 1 or not 1 <= s.nonzeros <= (m + q_rows) * t.embedding_dim:
                raise ValueError(f"CERP table {t.name!r}: bad shape {s}")
            for part, rows in (("r", min(m, t.num_embeddings)), ("q", q_rows)):
                self.params[f"{t.name}__{part}"] = nn.Parameter(torch.empty(rows, t.embedding_dim, device=device))
                self.params[f"{t.name}__{part}_threshold"] = nn.Parameter(
                    torch.full((1, t.embedding_dim), self.threshold_init, device=device))
                self.register_buffer(f"{t.name}__{part}_mask",
                                     torch.ones(rows, t.embedding_dim, dtype=torch.bool, device=device))

    def compressed_tables(self) -> list[str]:
        return list(self._shapes)

    @torch.no_grad()
    def after_init(self) -> None:
        """The thresholds start at `threshold_init` (the builder's N(0, std) init is for rows);
        then the first mask."""
        for table in self._shapes:
            for part in "rq":
                self.params[f"{table}__{part}_threshold"].fill_(self.threshold_init)
        self.refresh_masks()

    def _soft(self, table: str, part: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        w = self.params[f"{table}__{part}"]
        w = w if rows is None else w[rows]
        t = torch.sigmoid(self.params[f"{table}__{part}_threshold"]) * self.threshold_scale
        return torch.sign(w) * torch.relu(w.abs() - t)

    def pruned(self, table: str, part: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The meta table's effective rows (soft threshold, then the budget mask)."""
        mask = getattr(self, f"{table}__{part}_mask")
        w = self._soft(table, part, rows)
        return straight_through(w, (mask if rows is None else mask[rows]).to(w.dtype))

    @torch.no_grad()
    def refresh_masks(self) -> None:
        for table, s in self._shapes.items():
            r, q = self._soft(table, "r").abs(), self._soft(table, "q").abs()
            flat = torch.cat([r.flatten(), q.flatten()])
            keep = torch.zeros_like(flat, dtype=torch.bool)
            nonzero = flat > 0
            k = min(s.nonzeros, int(nonzero.sum()))
            if k:
                keep[flat.topk(k).indices] = True
            keep &= nonzero
            getattr(self, f"{table}__r_mask").copy_(keep[: r.numel()].view_as(r))
            getattr(self, f"{table}__q_mask").copy_(keep[r.numel():].view_as(q))

    def rows(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        if table not in self._shapes:
            return self.params[table][ids]
        ids = ids.long()
        m = self._shapes[table].collisions
        p, q = self.pruned(table, "r", ids % m), self.pruned(table, "q", ids // m)
        if self.training and self.reg:
            term = self.reg * (p.abs() * q.abs()).sum(1).mean()
            self._penalty = term if self._penalty is None else self._penalty + term
        return p + q

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self._penalty = None             # `rows` adds this batch's regulariser terms
        return super().forward(features)

    def penalty(self) -> torch.Tensor | None:
        """The complementarity regulariser of the last training forward (None outside training)."""
        return self._penalty

    def after_step(self, step: int) -> None:
        if self._shapes and self.refresh_every and step % self.refresh_every == 0:
            self.refresh_masks()

    def after_epoch(self, epoch: int, epochs: int, optimizer=None) -> None:
        self.refresh_masks()

    def nonzeros(self, table: str) -> int:
        """The non-zeros the table holds now (at most its budget)."""
        return int(sum(int((self.pruned(table, p).detach() != 0).sum()) for p in "rq"))

    def embedding_bytes(self) -> int:
        total = 0
        for name, t in self._tables.items():
            s = self._shapes.get(name)
            if s is None:
                total += _config_bytes(t)
                continue
            rows = self.params[f"{name}__r"].shape[0] + self.params[f"{name}__q"].shape[0]
            total += (s.nonzeros * (VALUE_BYTES + index_bytes(t.embedding_dim))
                      + (rows + 2) * ROWPTR_BYTES)
        return total

    @torch.no_grad()
    def export_table(self, table: str) -> tuple[dict, dict]:
        """CSR of both pruned meta tables, padded with explicit zeros up to the budget's
        non-zeros (so the export's bytes are the budget's)."""
        import numpy as np
        s, dim = self._shapes[table], self._tables[table].embedding_dim
        arrays, counts = {}, []
        for part in "rq":
            w = self.pruned(table, part).detach().cpu()
            nz = w != 0
            counts.append(int(nz.sum()))
            arrays[f"{part}_values"] = w[nz].numpy().astype(np.float32)
            arrays[f"{part}_indices"] = nz.nonzero()[:, 1].numpy().astype(_index_dtype(dim))
            arrays[f"{part}_rowptr"] = np.concatenate(
                [[0], np.cumsum(nz.sum(1).numpy())]).astype(np.int32)
        pad = s.nonzeros - sum(counts)                     # explicit zeros in the last q row
        if pad > 0:
            arrays["q_values"] = np.concatenate([arrays["q_values"], np.zeros(pad, np.float32)])
            arrays["q_indices"] = np.concatenate([arrays["q_indices"],
                                                  np.zeros(pad, arrays["q_indices"].dtype)])
            arrays["q_rowptr"][-1] += pad
        return ({"kind": "cerp", "collisions": s.collisions, "dim": dim, "nonzeros": s.nonzeros},
                arrays)


# --------------------------------------------------------------------------- serving
def lookup_exported(spec: dict, arrays: Mapping[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Rows `[len(ids), dim]` of an exported sparse / CCE / CERP table (what the training
    collection's lookup gives for one id per bag)."""
    ids = ids.long()
    kind = spec["kind"]
    if kind == "sparse":
        idx, vals = arrays["indices"][ids].long(), arrays["values"][ids]
        return torch.zeros(ids.numel(), spec["dim"], dtype=vals.dtype).scatter_(1, idx, vals)
    if kind == "cce":
        rows = spec["rows"]
        return torch.cat([arrays[f"first_{c}"][arrays["map"][c][ids].long()]
                          + arrays[f"second_{c}"][salted_hash(ids, rows, spec["salts"][c])]
                          for c in range(spec["chunks"])], dim=1)
    if kind == "cerp":
        m = spec["collisions"]
        return (_csr_rows(arrays, "r", ids % m, spec["dim"])
                + _csr_rows(arrays, "q", ids // m, spec["dim"]))
    raise ValueError(f"unknown compact table kind {kind!r}")


def _csr_rows(arrays, part: str, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows `rows` of a CSR meta table (values, column indices, row pointers), densified."""
    ptr = arrays[f"{part}_rowptr"].long()
    values = arrays[f"{part}_values"]
    row_of = torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr.diff())
    dense = torch.zeros(ptr.numel() - 1, dim, dtype=values.dtype)
    dense.index_put_((row_of, arrays[f"{part}_indices"].long()), values, accumulate=True)
    return dense[rows]
