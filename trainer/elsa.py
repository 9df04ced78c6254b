"""ELSA (Vancura, Alves, Kasalicky, Kordik: "Scalable Linear Shallow Autoencoder for
Collaborative Filtering", RecSys 2022) as a retrieval model on implicit feedback, with its item
embeddings from any collection of `trainer.builders.build_embedding_collection`
(`embedding.method`: full, cel, hash, qr, sparse, cce, cerp; the compact methods' `penalty`,
`after_step` and `after_epoch` hooks are called as trainer.loop calls them).

Model (written from the paper's description). An item matrix `A` (items x d),
rows L2-normalised: `A^ = diag(1 / ||A_i||) A`. For a user with binary interaction row `x`,

    scores  x^ = x A^ A^T - x

(`A^ A^T - I` is the item-item weight matrix: low rank, with a zero diagonal because the rows
have unit norm, so an item never predicts itself). Loss: the paper's normalised MSE,

    L = mean over the batch's users of || x^ / ||x^||  -  x / ||x|| ||^2

(the squared distance of the two directions, `2 - 2 cos(x^, x)`; a constant factor, such as a
mean over the catalogue's entries instead of the sum, does not change the optimum, and Adam(W)
is nearly invariant to it), minimised over user batches with AdamW (the paper trains with an
Adam variant; weight decay 0 by default).

How it is computed here, per batch of users: the batch's interactions (every training row with
label > 0 is a positive, repeated pairs once) and the whole catalogue go through the collection
in ONE lookup of a KJT with one id per bag (`interactions ++ 0..N-1`); rows are normalised; each
user's `x A^ = sum_{i in x_u} A^_i` is a segment sum of its interactions' rows (`index_add`);
scores are `(x A^) A^_catalogue^T - x`. Cost per step: the lookup of `nnz + N` rows, `O(B N d)`
for the scores and `O(B N)` memory (B users, N items): the full catalogue is scored for every
user, as the paper's loss needs every item's score. Fine for catalogues of 1e4-1e5 items (ML
sizes); evaluation scores users x items in chunks (`RankingEvaluator`).

CEL item embeddings. The collection itself records what GPCA splits need: each item's gradient
(it is looked up in every step, so its recorded gradient is the batch loss's full gradient with
respect to its row: decoder and encoder paths) and its training interactions (the catalogue part
of the lookup would count every item once more per step; those counts are taken back, so the
`interactions` split criterion counts real interactions only). Splits and reassignments run
through the library (`cel_torchrec.phases`: `ClusterSchedule`, `run_split`,
`run_reassignments`), with the reassignment scored by the ELSA loss itself, coordinate-wise:

    for item j under candidate row c: every user u's term of L, as a function of s_uj only,
        l_u(s) = 2 - 2 (a_u + x_uj s) / (||x_u|| sqrt(b_u + s^2)),
        s = z_uj . normalize(c),
    where a_u = sum_{k != j} x_uk s_uk and b_u = sum_{k != j} s_uk^2 (the user's other scores,
    held at their current values) and z_uj = x_u A^ - x_uj A^_j (the user's vector without j:
    for a positive the `- x_uj` of the score cancels j's own unit self-product exactly, so
    s_uj = z_uj . A^_j at any row of j). l_u is exact in s_uj: what the user's loss becomes when
    only j's decoder row moves. What it holds fixed: j's effect through the users' vectors
    z_u (j in x_u) on their other items' scores.

The library scores a candidate by `per_sample_loss(model(pooled, dense), label, "mse")`; the
phase model returns `sqrt(w l_u(s))` with label 0, so each pseudo-sample's "mse" is exactly
`w l_u(s)` (`ElsaPhaseModel`; `dense` carries `z_uj, a_u, b_u, 1/||x_u||, x_uj, w`).
Pseudo-samples per pass: every training positive (w = 1) and `reassign_negatives` uniform items
per positive of the user (draws on its positives dropped), each weighted `N / (r n_u)`
(Horvitz-Thompson: unbiased for the sum of l_u over the user's non-positives), so each item's
summed loss estimates sum over ALL users of l_u(s_uj). Exact reassignment (every item, every
active cluster) over those samples; its cost is `samples x clusters` evaluations of l_u, scored
through the library's batched-candidate hook (`ElsaPhaseModel.candidate_predictions`: one
product `z . normalize(c)` per sample and candidate; no linear form, as the row normalisation
and l_u are nonlinear).

    python -m trainer.elsa --data data/ml100k --method full --dim 64 --epochs 20 --lr 0.01 \\
        --out runs/elsa_full
    python -m trainer.elsa --data data/ml100k --method cel --compression 10 --dim 64 ...

Writes RUN_DIR/metrics.json (final and best-epoch-by-val-recall@20 metrics, bytes, clusters,
times) and RUN_DIR/metrics.jsonl (one line per epoch), and prints the run directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from cel_torchrec.phases import (REASSIGN, SPLIT, ClusterSchedule, Ranks, run_reassignments,
                                 run_split)
from trainer.loop import _jsonable
from trainer.models import ITEM, USER
from trainer.retrieval import RankingEvaluator, _csr, _pair_kjt, _read_pairs, _rows_of

EPS = 1e-12


class ElsaError(ValueError):
    """Bad ELSA inputs or settings."""


# ----------------------------------------------------------------------------- the math
def normalise_rows(rows: torch.Tensor) -> torch.Tensor:
    """A^: every row scaled to unit L2 norm (a zero row stays zero)."""
    return F.normalize(rows, dim=1, eps=EPS)


def elsa_scores(x: torch.Tensor, a_hat: torch.Tensor) -> torch.Tensor:
    """x A^ A^T - x for dense interaction rows `x` `[B, N]` and normalised items `[N, d]`."""
    if x.dim() != 2 or a_hat.dim() != 2 or x.shape[1] != a_hat.shape[0]:
        raise ElsaError(f"x must be [users, items] and A^ [items, d] with the same items, got "
                        f"{tuple(x.shape)} and {tuple(a_hat.shape)}")
    return (x @ a_hat) @ a_hat.T - x


def elsa_loss(scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-user normalised MSE `|| scores/||scores|| - x/||x|| ||^2`, `[B]` (users need >= 1
    positive)."""
    if scores.shape != x.shape:
        raise ElsaError(f"scores {tuple(scores.shape)} and x {tuple(x.shape)} differ in shape")
    if x.numel() and bool((x.sum(1) <= 0).any()):
        raise ElsaError("every user of an ELSA batch needs at least one positive")
    return (F.normalize(scores, dim=1, eps=EPS) - F.normalize(x, dim=1, eps=EPS)).pow(2).sum(1)


def batch_forward(emb, rows: torch.Tensor, cols: torch.Tensor, batch: int, num_items: int,
                  device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One lookup of the batch's interactions (`rows`: local user index, `cols`: item) plus the
    catalogue; returns (scores `[B, N]`, x `[B, N]`, catalogue rows A^ `[N, d]`)."""
    items = torch.cat([cols, torch.arange(num_items, device=device)])
    kjt = _pair_kjt(torch.zeros_like(items), items)      # the 1-row user table is never used
    pooled = emb(kjt).to_dict()[ITEM]
    _uncount_catalogue(emb, num_items)
    a_hat = normalise_rows(pooled.float())
    nnz = cols.numel()
    z = torch.zeros(batch, a_hat.shape[1], dtype=a_hat.dtype, device=device)
    z = z.index_add(0, rows, a_hat[:nnz])                # x A^ per user: a segment sum
    cat = a_hat[nnz:]
    x = torch.zeros(batch, num_items, dtype=a_hat.dtype, device=device)
    x[rows, cols] = 1.0
    return z @ cat.T - x, x, cat


def _uncount_catalogue(emb, num_items: int) -> None:
    """CEL counts every looked-up id as a training interaction; the catalogue part of the lookup
    is no interaction: take its one count per item back (training lookups only)."""
    states = getattr(emb, "cluster_states", None)
    if states is None or not (emb.training and torch.is_grad_enabled()):
        return
    if "item" in emb.clustered_tables:
        catalogue = torch.arange(num_items, device=states["item"].entity_interactions.device)
        states["item"].count_interactions(catalogue, sign=-1)


# ----------------------------------------------------------------------------- CEL phases
class ElsaPhaseModel(torch.nn.Module):
    """The reassignment's scorer (see the module docstring): `sqrt(w l_u(s))` with
    `s = z . normalize(item row)` and `dense = [z (d), a, b, 1/||x||, x_uj, w]`, so that the
    library's "mse" against label 0 is each pseudo-sample's weighted ELSA term."""

    def forward(self, pooled: dict, dense: torch.Tensor) -> torch.Tensor:
        e = normalise_rows(pooled[ITEM].float())
        s = (dense[:, :e.shape[1]] * e).sum(1)
        return self._from_scores(s[:, None], dense, e.shape[1])[:, 0]

    def candidate_predictions(self, pooled: dict, dense: torch.Tensor, feature: str,
                              candidates: torch.Tensor) -> torch.Tensor:
        """`[b, K]` predictions for candidate item rows `[K, D]` or `[b, K, D]`: one product
        `z . normalize(c)` per (sample, candidate), no repeated batch (the library's batched
        candidate hook, `cel_torchrec.phases.candidate_losses`)."""
        e = F.normalize(candidates.float(), dim=-1, eps=EPS)
        d = e.shape[-1]
        z = dense[:, :d]
        s = z @ e.T if e.dim() == 2 else torch.einsum("bd,bkd->bk", z, e)
        return self._from_scores(s, dense, d)

    @staticmethod
    def _from_scores(s: torch.Tensor, dense: torch.Tensor, d: int) -> torch.Tensor:
        """`sqrt(w l_u(s))` for scores `s` `[b, K]` of the moved item."""
        a, b, inv_norm, x, w = (c[:, None] for c in dense[:, d:d + 5].unbind(1))
        cos = (a + x * s) * inv_norm / torch.sqrt((b + s * s).clamp_min(EPS))
        return torch.sqrt((w * (2.0 - 2.0 * cos)).clamp_min(0.0))


def phase_batches(emb, indptr: np.ndarray, indices: np.ndarray, num_items: int, negatives: int,
                  generator: np.random.Generator, device, batch_users: int = 256,
                  sample_batch: int = 4096):
    """A list of the reassignment pass's `(kjt, dense, label)` (see the module docstring), built
    from the current item rows (one no-grad lookup of the catalogue)."""
    was = emb.training
    emb.eval()
    with torch.no_grad():
        a_hat = normalise_rows(_lookup_items(emb, num_items, device))
    emb.train(was)
    d = a_hat.shape[1]
    users = np.flatnonzero(np.diff(indptr) > 0)
    out = []
    for start in range(0, users.size, batch_users):
        chunk = users[start:start + batch_users]
        rows_np, cols_np = _rows_of(indptr, indices, chunk)
        rows, cols = torch.from_numpy(rows_np).to(device), torch.from_numpy(cols_np).to(device)
        b = chunk.size
        n_u = torch.from_numpy(np.diff(indptr)[chunk]).to(device).float()
        with torch.no_grad():
            z = torch.zeros(b, d, device=device).index_add(0, rows, a_hat[cols])
            x = torch.zeros(b, num_items, device=device)
            x[rows, cols] = 1.0
            s = z @ a_hat.T - x                                   # current scores
            sx, ss = (s * x).sum(1), (s * s).sum(1)
            # positives: every one, weight 1, the user's vector without the item
            ps = s[rows, cols]
            pos = torch.cat([z[rows] - a_hat[cols],
                             torch.stack([sx[rows] - ps, ss[rows] - ps * ps,
                                          n_u[rows].rsqrt(), torch.ones_like(ps),
                                          torch.ones_like(ps)], 1)], 1)
            parts, items = [pos], [cols]
            if negatives > 0:
                nrows = rows.repeat(negatives)
                draw = torch.from_numpy(generator.integers(0, num_items, nrows.numel())).to(device)
                keep = x[nrows, draw] == 0                         # draws on positives dropped
                nrows, draw = nrows[keep], draw[keep]
                ns = s[nrows, draw]
                w = num_items / (negatives * n_u[nrows])          # Horvitz-Thompson
                parts.append(torch.cat([z[nrows],
                                        torch.stack([sx[nrows], ss[nrows] - ns * ns,
                                                     n_u[nrows].rsqrt(), torch.zeros_like(ns),
                                                     w], 1)], 1))
                items.append(draw)
            dense, item_ids = torch.cat(parts), torch.cat(items)
        # ElsaPhaseModel.candidate_predictions scores a batch's samples x clusters with one
        # product (no batch repeated per cluster), and the library chunks that to 2^18 cells;
        # larger batches only save lookups (ML-100K, 141 clusters: 4,096 samples per batch
        # reassign 21x faster than 256 did with the repeated forward, with equal results)
        for lo in range(0, item_ids.numel(), sample_batch):
            ids = item_ids[lo:lo + sample_batch]
            out.append((_pair_kjt(torch.zeros_like(ids), ids), dense[lo:lo + sample_batch],
                        torch.zeros(ids.numel(), device=device)))
    return out


def _lookup_items(emb, num_items: int, device, chunk: int = 65536) -> torch.Tensor:
    out = []
    for start in range(0, num_items, chunk):
        ids = torch.arange(start, min(num_items, start + chunk), device=device)
        out.append(emb(_pair_kjt(torch.zeros_like(ids), ids)).to_dict()[ITEM].float())
    return torch.cat(out)


# ----------------------------------------------------------------------------- evaluation
class _ElsaRows:
    """What `RankingEvaluator.evaluate` looks up: users' `x_u A^` (from their training items)
    and items' `A^`, as a collection stand-in."""

    def __init__(self, users: torch.Tensor, items: torch.Tensor):
        self.users, self.items = users, items

    def __call__(self, kjt):
        u, i = self.users[kjt[USER].values()], self.items[kjt[ITEM].values()]
        return type("Pooled", (), {"to_dict": lambda self: {USER: u, ITEM: i}})()


class _ElsaScorer:
    """`score_matrix(x A^, A^) = x A^ A^T`: ELSA's scores without the `- x`, which only touches
    the user's training items, and those the evaluator excludes anyway."""

    @staticmethod
    def score_matrix(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return users @ items.T


@torch.no_grad()
def ranking_metrics(emb, evaluator: RankingEvaluator, indptr: np.ndarray, indices: np.ndarray,
                    num_users: int, num_items: int, device) -> dict:
    was = emb.training
    emb.eval()
    a_hat = normalise_rows(_lookup_items(emb, num_items, device))
    emb.train(was)
    rows, cols = _rows_of(indptr, indices, np.arange(num_users))
    z = torch.zeros(num_users, a_hat.shape[1], device=device).index_add(
        0, torch.from_numpy(rows).to(device), a_hat[torch.from_numpy(cols).to(device)])
    return evaluator.evaluate(_ElsaRows(z, a_hat), _ElsaScorer(), Ranks(), device)


# ----------------------------------------------------------------------------- training
@dataclasses.dataclass
class ElsaConfig:
    data: str
    out: str
    method: str = "full"
    dim: int = 64
    epochs: int = 20
    lr: float = 0.01
    weight_decay: float = 0.0
    batch_users: int = 128
    compression: float = 0.0
    init_std: float = 0.1
    seed: int = 0
    # CEL (method cel): budget when --compression is not set, and the phase schedule in steps
    clusters: int = 50
    splits_per_event: int = 0
    split_interval: int = 2
    split_until: int = 10 ** 9
    reassign_every: int = 0            # steps between reassignments (0: once per epoch)
    reassign_until: int = 10 ** 9      # no reassignment from this step on
    reassign_negatives: int = 2
    keep_prob: float = 0.31
    cold_threshold: int = 5
    eval_users: int = 0
    overrides: tuple[str, ...] = ()    # further `key=value` of trainer.config (e.g. sparse's)

    def check(self) -> None:
        for name in ("dim", "epochs", "batch_users", "clusters", "split_interval"):
            if getattr(self, name) < 1:
                raise ElsaError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ElsaError(f"lr must be > 0, got {self.lr}")
        if self.reassign_negatives < 0 or self.reassign_every < 0:
            raise ElsaError("reassign_negatives and reassign_every must be >= 0")
        if not (self.compression == 0 or self.compression > 1):
            raise ElsaError(f"compression must be 0 (off) or > 1, got {self.compression}")


def train_config(cfg: ElsaConfig):
    """The trainer config whose item table `build_embedding_collection` builds. model.name is
    two_tower only so that the tables are exactly `dim` wide (MF's would add a bias column);
    no two-tower model is built."""
    from trainer.config import TrainConfig, apply_overrides
    base = TrainConfig.from_dict({
        "model": {"name": "two_tower", "embedding_dim": cfg.dim, "init_std": cfg.init_std},
        # min_cardinality 2: --compression always reaches the item table (the trainer's default
        # 1,000 would leave a small catalogue full); the unused 1-row user table stays out
        "embedding": {"method": cfg.method, "compression": cfg.compression,
                      "min_cardinality": 2},
        "cel": {"items": {"enabled": True, "max_clusters": cfg.clusters,
                          "splits_per_event": cfg.splits_per_event},
                "users": {"enabled": False, "max_clusters": 1}},
        "train": {"seed": cfg.seed}})
    return apply_overrides(base, list(cfg.overrides))


def load_positives(data: pathlib.Path, split: str, num_users: int, num_items: int):
    users, items, labels = _read_pairs(data / split)
    keep = labels > 0
    if users.size and (users.max() >= num_users or items.max() >= num_items):
        raise ElsaError(f"{data / split}: ids outside the meta.json's {num_users} users / "
                        f"{num_items} items")
    return _csr(users[keep], items[keep], num_users, num_items)


def train(cfg: ElsaConfig) -> dict:
    """Train, evaluate every epoch, write the run directory; the final metrics."""
    return fit(cfg)[0]


def fit(cfg: ElsaConfig) -> tuple[dict, torch.nn.Module]:
    """`train`, also returning the trained embedding collection."""
    cfg.check()
    from data_pipeline.dataset import load_meta, load_train_counts
    from trainer.builders import build_embedding_collection
    data = pathlib.Path(cfg.data)
    if not (data / "meta.json").exists():
        raise ElsaError(f"{data}: not a prepared dataset (no meta.json); run "
                        f"`python -m data_pipeline prepare ...` first")
    meta = load_meta(data)
    if "val" not in meta.splits:
        raise ElsaError(f"{data}: no val split to evaluate on")
    n_users, n_items = meta.num_users, meta.num_items
    torch.manual_seed(cfg.seed)
    device = torch.device("cpu")
    run_dir = pathlib.Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    tcfg = train_config(cfg)
    emb = build_embedding_collection(tcfg, 1, n_items, device)
    item_bytes = int(emb.embedding_bytes()) - 4 * cfg.dim        # less the unused 1-row user table
    indptr, indices = load_positives(data, "train", n_users, n_items)
    if indices.size == 0:
        raise ElsaError(f"{data}: the train split has no positive (label > 0) rows")
    evaluator = RankingEvaluator(data, "val", n_users, n_items, load_train_counts(data, "users"),
                                 load_train_counts(data, "items"), cfg.cold_threshold,
                                 max_users=cfg.eval_users, seed=cfg.seed)
    optimizer = torch.optim.AdamW(emb.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    cel = emb if getattr(emb, "clustered_tables", None) else None
    active = np.flatnonzero(np.diff(indptr) > 0)
    steps_per_epoch = -(-active.size // cfg.batch_users)
    schedule = None
    if cel is not None:
        schedule = ClusterSchedule(split_interval=cfg.split_interval, split_until=cfg.split_until,
                                   reassign_rule="every",
                                   reassign_period=cfg.reassign_every or steps_per_epoch,
                                   unit="step")
        for table in cel.clustered_tables:
            cel.begin_split_window(table)
    rng = np.random.default_rng(cfg.seed)
    phase_rng = np.random.default_rng(cfg.seed + 1)
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    phase_seconds = {"split": 0.0, "reassign": 0.0}
    history, step, train_seconds = [], 0, 0.0
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        emb.train()
        order = rng.permutation(active)
        total = 0.0
        for start in range(0, order.size, cfg.batch_users):
            chunk = order[start:start + cfg.batch_users]
            rows_np, cols_np = _rows_of(indptr, indices, chunk)
            rows, cols = torch.from_numpy(rows_np), torch.from_numpy(cols_np)
            scores, x, _ = batch_forward(emb, rows, cols, chunk.size, n_items, device)
            per_user = elsa_loss(scores, x)
            loss = per_user.mean()
            penalty = _hook(emb, "penalty")          # the compact methods' hooks (CERP, CCE)
            objective = loss if penalty is None else loss + penalty
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            _hook(emb, "after_step", step + 1)
            total += float(loss.detach()) * chunk.size
            step += 1
            if cel is not None:
                cel.observe_losses(torch.cat([per_user.detach()[rows], torch.zeros(n_items)]))
                _phases(cel, schedule, step, cfg, optimizer, generator, phase_seconds,
                        lambda: phase_batches(cel, indptr, indices, n_items,
                                              cfg.reassign_negatives, phase_rng, device))
        _hook(emb, "after_epoch", epoch + 1, cfg.epochs, optimizer)
        train_seconds += time.perf_counter() - t0
        val = ranking_metrics(emb, evaluator, indptr, indices, n_users, n_items, device)
        record = {"epoch": epoch + 1, "step": step, "train_loss": total / max(active.size, 1),
                  "train_time_s": train_seconds, **{f"val_{k}": v for k, v in val.items()},
                  **_cluster_counts(cel)}
        history.append(record)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
        print(f"[elsa] epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f} "
              f"val recall@20 {val['recall_at_20']:.4f} ndcg@20 {val['ndcg_at_20']:.4f}"
              + "".join(f" {k} {v}" for k, v in _cluster_counts(cel).items()), flush=True)
    best = max(history, key=lambda h: h["val_recall_at_20"]
               if math.isfinite(h["val_recall_at_20"]) else -1.0)
    metrics = {**history[-1], "method": cfg.method, "model": "elsa", "dim": cfg.dim,
               "lr": cfg.lr, "weight_decay": cfg.weight_decay, "compression": cfg.compression,
               "embedding_bytes": int(emb.embedding_bytes()), "item_side_bytes": item_bytes,
               "best_epoch": best["epoch"], "time_to_best_s": best["train_time_s"],
               **{f"best_{k}": v for k, v in best.items() if k.startswith("val_")},
               "split_time_s": phase_seconds["split"], "reassign_time_s": phase_seconds["reassign"],
               "steps": step, "epochs": cfg.epochs}
    (run_dir / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")
    print(f"[elsa] run dir {run_dir}", flush=True)
    return metrics, emb


def _phases(cel, schedule, step, cfg, optimizer, generator, seconds, make_batches) -> None:
    actions = schedule.actions(step)
    for table in cel.clustered_tables:
        state = cel.cluster_states[table]
        if SPLIT in actions and state.num_active < state.capacity:
            seconds["split"] += run_split(cel, table, optimizer).seconds
    if REASSIGN in actions and step < cfg.reassign_until:
        t0 = time.perf_counter()
        batches = make_batches()
        run_reassignments(cel, ElsaPhaseModel(), batches, cel.clustered_tables, loss="mse",
                          generator=generator, keep_prob=cfg.keep_prob, optimizer=optimizer,
                          mode="exact")
        seconds["reassign"] += time.perf_counter() - t0


def _hook(emb, name: str, *args):
    """The collection's hook `name` where it has one (as trainer.loop's `method_hook`)."""
    fn = getattr(emb, name, None)
    return fn(*args) if fn is not None else None


def _cluster_counts(cel) -> dict:
    if cel is None:
        return {}
    return {"num_clusters_items": cel.cluster_states["item"].num_active}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m trainer.elsa", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a prepared dataset directory")
    p.add_argument("--out", required=True, help="the run directory")
    p.add_argument("--method", default="full", help="embedding.method of the item table")
    defaults = ElsaConfig(data="", out="")
    for f in dataclasses.fields(ElsaConfig):
        if f.name in ("data", "out", "method", "overrides"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer.config override (repeatable), e.g. embedding.hash_buckets.items=100")
    args = vars(p.parse_args(argv))
    args["overrides"] = tuple(args.pop("set"))
    torch.set_num_threads(1)
    try:
        return train(ElsaConfig(**args))
    except ValueError as exc:        # ElsaError, ConfigError, builder errors: one clear line
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
