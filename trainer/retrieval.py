"""Retrieval on implicit feedback: training with sampled or in-batch negatives, and ranking
metrics over the full catalogue.

Every training row whose label is > 0 is a positive (a rating, a play, a click); rows with label
0 are never positives. Two losses (`train.loss`):

- `bpr` (Rendle et al., 2009): each positive (u, i) meets `train.negatives` items j drawn
  uniformly from the catalogue, loss `-log sigmoid(s(u, i) - s(u, j))`. The negatives ride in the
  same lookup as the positives (the batch is widened to B * (1 + negatives) rows), so CEL's
  split windows see their gradients too.
- `softmax`: sampled softmax with in-batch negatives (every other positive's item in the batch),
  logQ-corrected by the items' training frequency (Yi et al., 2019); copies of the positive's own
  item in the batch are masked.

CEL's reassignment scores candidate clusters with a per-sample loss, the library's logistic
loss on `s(u, i) - offset` (`CalibratedScores`; the offset rides in the dense column), over each
positive (label 1) and one uniform noise item per positive (label 0):

- `bpr`: the offset of a positive is its noise item's current score and that of a noise item is
  its positive's, so each sample's loss is exactly its BPR pair's term with the other item held
  at its current row.
- `softmax`: noise-contrastive estimation's classifier (Gutmann & Hyvarinen, 2010) with uniform
  noise: offset `log mean_j exp s(u, j)`, so the logit is the log-odds of "a positive rather
  than a random item" under the model's softmax over the catalogue. The mean runs over every
  item when the catalogue has at most `NORMALISER_ITEMS`, else over a uniform sample of that
  many per pass; computed once per pass for every user (one `[users, NORMALISER_ITEMS]`
  product, in chunks).

Both ranking losses are invariant to a per-user shift of the scores; a logistic loss on the raw
scores reads that arbitrary shift, and on ML-100K its exact reassignment collapsed 1,085 of
1,682 items into one cluster.

Ranking metrics (`RankingEvaluator`): for every evaluated user, every item of the catalogue is
scored (`score_matrix`: one matrix product per chunk of users), the user's training items are
excluded, and the top 50 are compared with the user's positives in the split. recall@K is
hits / min(K, positives) (the normalised recall of Liang et al., 2018, so that 1 is reachable),
NDCG@K has binary gains; both are averaged over users with a positive. `_cold_users`: over users
with fewer than `data.cold_threshold` training interactions; `_cold_items`: the same ranking,
counting only cold items as relevant (over users with a cold-item positive).
"""
from __future__ import annotations

import math
import pathlib

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.models import ITEM, USER

RETRIEVAL_LOSSES = ("bpr", "softmax")
RETRIEVAL_MODELS = ("mf", "gmf", "two_tower")
KS = (10, 20, 50)
NORMALISER_ITEMS = 4096


def is_retrieval(loss: str) -> bool:
    return loss in RETRIEVAL_LOSSES


def check_retrieval_config(cfg, sparse_features) -> None:
    """Clear errors for settings the retrieval losses cannot train."""
    from trainer.config import ConfigError
    t = cfg.train
    if cfg.model.name not in RETRIEVAL_MODELS:
        raise ConfigError(f"train.loss={t.loss} scores every item for a user (score_matrix): "
                          f"model.name must be one of {', '.join(RETRIEVAL_MODELS)}, got "
                          f"{cfg.model.name!r}")
    if sparse_features:
        raise ConfigError(f"train.loss={t.loss}: the dataset has extra sparse features "
                          f"{list(sparse_features)}; retrieval trains on (user, item) only")
    if t.negatives < 1:
        raise ConfigError(f"train.negatives must be >= 1, got {t.negatives}")


def _pair_kjt(users: torch.Tensor, items: torch.Tensor) -> KeyedJaggedTensor:
    """A KJT of one user and one item id per sample, its layout handed on (no host read)."""
    n = users.numel()
    return KeyedJaggedTensor(keys=[USER, ITEM], values=torch.cat([users, items]),
                             lengths=torch.ones(2 * n, dtype=torch.int32, device=users.device),
                             stride=n, length_per_key=[n, n], offset_per_key=[0, n, 2 * n])


def _split_pairs(kjt: KeyedJaggedTensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    values = kjt.values()          # [users (B), items (B)]: one id per sample per key
    return values[:size], values[size:2 * size]


class NegativeSampler:
    """Uniform negatives over the item catalogue, from its own generator (reproducible)."""

    def __init__(self, num_items: int, negatives: int, seed: int):
        self.num_items = int(num_items)
        self.negatives = int(negatives)
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, n: int, device) -> torch.Tensor:
        return torch.randint(self.num_items, (n,), generator=self.generator).to(device)

    def widen(self, kjt, dense, label):
        """(kjt, dense, label) of B positives -> B * (1 + negatives) rows: the positives, then
        `negatives` blocks of (the same users, uniform items) with label 0."""
        size = label.numel()
        users, items = _split_pairs(kjt, size)
        neg = self.draw(size * self.negatives, users.device)
        out_users = users.repeat(1 + self.negatives)
        wide = _pair_kjt(out_users, torch.cat([items, neg]))
        dense = None if dense is None else dense.repeat(1 + self.negatives, 1)
        return wide, dense, torch.cat([label, torch.zeros_like(neg, dtype=label.dtype)])


class RetrievalObjective:
    """The training batches and losses of `train.loss: bpr | softmax`."""

    def __init__(self, loss: str, num_items: int, negatives: int, item_counts: torch.Tensor,
                 seed: int):
        if loss not in RETRIEVAL_LOSSES:
            raise ValueError(f"retrieval loss must be one of {RETRIEVAL_LOSSES}, got {loss!r}")
        self.loss = loss
        self.sampler = NegativeSampler(num_items, negatives, seed)
        # reassignment's noise items come from a generator of their own, so a pass does not
        # shift the training negatives: one uniform item per positive (NCE with k = 1)
        self.reassign_sampler = NegativeSampler(num_items, 1, seed + 7919)
        self.normaliser_sampler = NegativeSampler(num_items, 1, seed + 7920)
        counts = item_counts.double().clamp_min(0) + 1.0           # +1: items never trained
        self.log_q = torch.log(counts / counts.sum()).float()

    def training_batch(self, kjt, dense, label):
        if self.loss == "bpr":
            return self.sampler.widen(kjt, dense, label)
        return kjt, dense, label

    def losses(self, model, kjt, embs: dict, dense, label: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss to minimise, per-row losses of the looked-up batch `kjt` for the CEL
        loss statistics). `model` is what the step calls (possibly DDP-wrapped)."""
        if self.loss == "bpr":
            return self._bpr(model, embs, dense, label)
        return self._softmax(model, _split_pairs(kjt, label.numel())[1], embs, dense, label)

    def _bpr(self, model, embs, dense, label):
        n = self.sampler.negatives
        size = label.numel() // (1 + n)
        scores = model(embs, dense)
        pos, neg = scores[:size], scores[size:].view(n, size)
        pair = torch.nn.functional.softplus(neg - pos)             # -log sigmoid(pos - neg)
        weight = (label[:size] > 0).float()                        # label-0 rows: no positive
        loss = (pair * weight).sum() / (weight.sum() * n).clamp_min(1.0)
        per_row = torch.cat([pair.mean(0), pair.reshape(-1)]) * weight.repeat(1 + n)
        return loss, per_row.detach()

    def _softmax(self, model, items, embs, dense, label):
        size = label.numel()
        logits = model(embs, dense, all_pairs=True)                # [B users, B items]
        logits = logits - self.log_q.to(logits.device)[items].unsqueeze(0)
        same = items.unsqueeze(0) == items.unsqueeze(1)
        eye = torch.eye(size, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same & ~eye, float("-inf"))
        target = torch.arange(size, device=logits.device)
        per_row = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        weight = (label > 0).float()
        loss = (per_row * weight).sum() / weight.sum().clamp_min(1.0)
        return loss, (per_row * weight).detach()

    def pointwise(self, kjt, dense, label):
        """One batch as the surrogate's samples: its positives (label 1) and one uniform noise
        item per positive (label 0), from the reassignment's own generator."""
        return self.reassign_sampler.widen(kjt, dense, (label > 0).to(label.dtype))

    def normaliser_items(self, emb, device) -> torch.Tensor:
        """The item rows the calibration averages over: every item, or a uniform sample.
        A lookup through `emb` (collective when sharded: every rank calls it)."""
        n = self.sampler.num_items
        ids = (torch.arange(n) if n <= NORMALISER_ITEMS
               else self.normaliser_sampler.draw(NORMALISER_ITEMS, "cpu"))
        with torch.no_grad():
            return lookup_rows(emb, ids.numpy(), ITEM, device)

    def user_log_normalisers(self, emb, model, num_users: int, device,
                             chunk: int = 4096) -> torch.Tensor:
        """softmax: every user's `log mean_j exp s(u, j)` over the normaliser's items, as of
        now: one `[users, NORMALISER_ITEMS]` product in chunks a pass (float32 per user)."""
        items = self.normaliser_items(emb, device)
        out = []
        with torch.no_grad():
            for start in range(0, num_users, chunk):
                ids = np.arange(start, min(num_users, start + chunk), dtype=np.int64)
                users = lookup_rows(emb, ids, USER, device)
                scores = model.score_matrix(users, items.to(users.device)).float()
                out.append(torch.logsumexp(scores, dim=1) - math.log(items.shape[0]))
        return torch.cat(out) if out else torch.zeros(0)

    def with_offsets(self, batches, emb, model, user_offsets: torch.Tensor | None):
        """Each widened (kjt, dense, label, ...) with `dense` = the offset column that
        `CalibratedScores` subtracts (see the module docstring): bpr, the pair partner's current
        score; softmax, the user's log-normaliser from `user_offsets`."""
        for kjt, _dense, label, *rest in batches:
            with torch.no_grad():
                if self.loss == "bpr":
                    score = model(emb(kjt).to_dict(), None).float()
                    half = score.numel() // 2      # positives, then their noise items
                    offset = torch.cat([score[half:], score[:half]])
                else:
                    users = _split_pairs(kjt, label.numel())[0]
                    offset = user_offsets.to(users.device)[users]
            yield (kjt, offset.unsqueeze(1), label, *rest)

    def phase_offsets(self, emb, model, num_users: int, device) -> torch.Tensor | None:
        """What `with_offsets` needs for this pass (collective when sharded)."""
        if self.loss == "softmax":
            return self.user_log_normalisers(emb, model, num_users, device)
        return None

    def reassign_batches(self, batches, emb, model, num_users: int, device):
        """The reassignment pass's batches: positives and noise items, with their offsets in
        the dense column (softmax: the users' log-normalisers computed first)."""
        offsets = self.phase_offsets(emb, model, num_users, device)
        widened = ((*self.pointwise(kjt, dense, label), *rest)
                   for kjt, dense, label, *rest in batches)
        yield from self.with_offsets(widened, emb, model, offsets)


class CalibratedScores(torch.nn.Module):
    """The reassignment's logit: the interaction model's score minus the per-row offset that
    `RetrievalObjective.with_offsets` puts in the dense column; keeps the model's linear form
    (exact closed-form reassignment) where it has one."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        if hasattr(model, "linear_form"):
            self.linear_form = self._linear_form

    def forward(self, embeddings: dict, dense: torch.Tensor) -> torch.Tensor:
        return self.model(embeddings, None) - dense[:, 0]

    def _linear_form(self, embeddings: dict, dense: torch.Tensor, feature: str):
        x, const = self.model.linear_form(embeddings, None, feature)
        return x, const - dense[:, 0]


def lookup_rows(emb, ids: np.ndarray, feature: str, device, chunk: int = 65536) -> torch.Tensor:
    """`feature`'s embedding rows of `ids` through the (possibly sharded) collection, in
    chunks; every rank must call it with the same number of chunks."""
    out = []
    for start in range(0, ids.size, chunk):
        part = torch.from_numpy(np.ascontiguousarray(ids[start:start + chunk])).to(device)
        other = torch.zeros_like(part)
        kjt = _pair_kjt(part, other) if feature == USER else _pair_kjt(other, part)
        out.append(emb(kjt).to_dict()[feature].float())
    return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------- ranking metrics
def _csr(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user, item) pairs as CSR rows by user (a repeated interaction counts once)."""
    pairs = np.unique(users.astype(np.int64) * num_items + items)
    users, items = pairs // num_items, pairs % num_items
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=num_users), out=indptr[1:])
    return indptr, items


def _rows_of(indptr: np.ndarray, indices: np.ndarray, users: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """(local row, column) of every stored entry of `users`' CSR rows, vectorised."""
    lengths = indptr[users + 1] - indptr[users]
    total = int(lengths.sum())
    rows = np.repeat(np.arange(users.size), lengths)
    first = np.repeat(indptr[users], lengths)
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, indices[first + within]


def _read_pairs(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import pyarrow.dataset as ds
    table = ds.dataset(str(path), format="parquet").to_table(columns=[USER, ITEM, "label"])
    return (table.column(USER).to_numpy().astype(np.int64),
            table.column(ITEM).to_numpy().astype(np.int64),
            table.column("label").to_numpy())


class RankingEvaluator:
    """recall@K and NDCG@K (K = 10, 20, 50) over the full catalogue for a split's users,
    training items excluded. `max_users` > 0 evaluates a fixed random sample of them."""

    def __init__(self, data_dir: pathlib.Path, split: str, num_users: int, num_items: int,
                 user_counts, item_counts, cold_threshold: int, max_users: int = 0,
                 seed: int = 0, score_budget_bytes: int = 64 << 20):
        self.num_users, self.num_items = int(num_users), int(num_items)
        tu, ti, _ = _read_pairs(data_dir / "train")
        self.train_indptr, self.train_items = _csr(tu, ti, self.num_users, self.num_items)
        vu, vi, vl = _read_pairs(data_dir / split)
        keep = vl > 0
        self.target_indptr, self.target_items = _csr(vu[keep], vi[keep], self.num_users,
                                                     self.num_items)
        users = np.flatnonzero(np.diff(self.target_indptr) > 0)
        if max_users and users.size > max_users:
            users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
        self.users = users
        uc = np.asarray(user_counts, dtype=np.int64)
        ic = np.asarray(item_counts, dtype=np.int64)
        self.cold_user = np.zeros(self.num_users, dtype=bool)
        self.cold_user[:uc.size] = uc < cold_threshold
        self.cold_user[uc.size:] = True
        self.cold_item = np.ones(self.num_items, dtype=bool)
        self.cold_item[:ic.size] = ic[:self.num_items] < cold_threshold
        self.chunk_users = max(1, score_budget_bytes // (4 * max(self.num_items, 1)))

    @torch.no_grad()
    def evaluate(self, emb, model, env, device) -> dict:
        # every rank looks up every item and every evaluated user (same chunks on every rank:
        # a sharded collection's collectives stay matched), then scores its share of the users
        items = lookup_rows(emb, np.arange(self.num_items, dtype=np.int64), ITEM, device)
        user_rows = lookup_rows(emb, self.users, USER, device)
        mine = np.arange(env.rank, self.users.size, env.world_size)
        sums = np.zeros(len(_METRIC_NAMES) * 2, dtype=np.float64)   # metric sums, then counts
        for start in range(0, mine.size, self.chunk_users):
            local = mine[start:start + self.chunk_users]
            sums += self._chunk(model, user_rows[torch.from_numpy(local)], self.users[local], items)
        if env.distributed:
            from trainer.dist import all_reduce_
            t = torch.from_numpy(sums)
            all_reduce_(t, env)
            sums = t.numpy()
        n = len(_METRIC_NAMES)
        out = {name: (float(sums[j] / sums[n + j]) if sums[n + j] else float("nan"))
               for j, name in enumerate(_METRIC_NAMES)}
        out["count_ranking_users"] = int(sums[n + _METRIC_NAMES.index("recall_at_10")])
        out["count_ranking_users_cold_items"] = int(sums[n + _METRIC_NAMES.index("recall_at_10_cold_items")])
        out["count_ranking_users_cold_users"] = int(sums[n + _METRIC_NAMES.index("recall_at_10_cold_users")])
        return out

    def _chunk(self, model, user_emb: torch.Tensor, users: np.ndarray, items: torch.Tensor
               ) -> np.ndarray:
        scores = model.score_matrix(user_emb, items).float().cpu()
        rows, cols = _rows_of(self.train_indptr, self.train_items, users)
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = float("-inf")
        kmax = min(max(KS), self.num_items)
        top = torch.topk(scores, kmax, dim=1).indices.numpy()              # [U, kmax]
        trows, tcols = _rows_of(self.target_indptr, self.target_items, users)
        keys = trows * self.num_items + tcols
        hit = np.isin(np.arange(users.size)[:, None] * self.num_items + top, keys)
        cold_hit = hit & self.cold_item[top]
        npos = np.bincount(trows, minlength=users.size)
        npos_cold = np.bincount(trows, weights=self.cold_item[tcols], minlength=users.size)
        cold_u = self.cold_user[users]
        disc = 1.0 / np.log2(np.arange(2, kmax + 2))
        idcg = np.concatenate([[0.0], np.cumsum(disc)])
        vals = []
        for k in KS:
            kk = min(k, kmax)
            for h, n_rel, mask in ((hit, npos, npos > 0), (cold_hit, npos_cold, npos_cold > 0)):
                denom = np.minimum(kk, n_rel).astype(np.int64)
                safe = np.maximum(denom, 1)
                recall = h[:, :kk].sum(1) / safe
                ndcg = (h[:, :kk] * disc[:kk]).sum(1) / np.maximum(idcg[safe], 1e-12)
                vals.append((recall, ndcg, mask))
        sums, counts = [], []
        for j, name in enumerate(_METRIC_NAMES):
            k_index, kind, slice_ = _METRIC_SPECS[j]
            recall, ndcg, mask = vals[2 * k_index + (1 if slice_ == "cold_items" else 0)]
            m = mask & cold_u if slice_ == "cold_users" else mask
            v = recall if kind == "recall" else ndcg
            sums.append(float(v[m].sum()))
            counts.append(float(m.sum()))
        return np.array(sums + counts)


_METRIC_SPECS = [(ki, kind, slice_) for ki, _ in enumerate(KS) for slice_ in ("all", "cold_users", "cold_items")
                 for kind in ("recall", "ndcg")]
_METRIC_NAMES = [f"{kind}_at_{KS[ki]}" + ("" if slice_ == "all" else f"_{slice_}")
                 for ki, kind, slice_ in _METRIC_SPECS]
