"""The training recipe: setup / train / evaluate / save_checkpoint / cleanup, readable top to
bottom. One step: Parquet batch -> KJT -> embedding collection (CEL remaps ids to clusters) ->
interaction model -> loss -> backward (cluster rows get averaged gradients; split windows record
per-entity gradients) -> optimizer step -> at scheduled safe points, split / reassign."""
from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

import numpy as np
import torch

from cel_torchrec.modules import ClusteredEmbeddingBagCollection, FullEmbeddingBagCollection
from cel_torchrec.phases import (REASSIGN, SPLIT, ClusterSchedule, RecentInteractions,
                                 coverage_window_steps, per_sample_loss, resolve_reassign_mode,
                                 run_reassignments, run_split)
from data_pipeline.dataset import load_meta, load_train_counts
from trainer.builders import (CONFIG_KEY_OF_TABLE, build_embedding_collection, resolve_dataset,
                              table_specs)
from trainer.checkpointing import CheckpointClient, code_commit
from trainer.config import TrainConfig, config_to_dict
from trainer.dist import DistEnv, init_single_process_group
from trainer.logs import attach_run_log, detach_run_log
from trainer.metrics import MetricAccumulator, cluster_size_histogram
from trainer.models import CTR_MODELS, build_model
from trainer.planted import planted_metrics, setup_planted
from trainer.progress import progress
from trainer.retrieval import (CalibratedScores, RankingEvaluator, RetrievalObjective,
                               check_retrieval_config, is_retrieval)
from trainer.sources import BatchSource, local_source, padded, synchronised
from trainer.tables import choose_table_update
from trainer.tracking import build_loggers

# ----------------------------------------------------------------------------- the recipe
class TrainRecipe:
    """setup() -> train() -> cleanup(); save_checkpoint() at epoch ends and every
    `run.checkpoint_every_steps`. `ray_ctx` (from jobs.ray_train) supplies data shards and
    checkpoint reporting when running under Ray Train."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, ray_ctx: Any = None):
        self.cfg = cfg
        self.env = env
        self.ray_ctx = ray_ctx
        self.step = 0
        self.epoch = 0
        self.phase_seconds = {"split": 0.0, "reassign": 0.0}
        self.split_due: dict[str, int] = {}     # cel.split_coverage: step each window closes
        self._phase_totals: dict[str, float] = {}
        self.train_seconds = 0.0
        self.state_bytes_peak = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.train.seed)
        self.run_dir = self._run_dir()
        self._run_log = attach_run_log(self.run_dir, env.rank)
        self.data_dir = resolve_dataset(cfg, env)
        self.commit = code_commit()
        self.meta = load_meta(self.data_dir)
        self.user_counts = torch.from_numpy(np.array(load_train_counts(self.data_dir, "users")))
        self.item_counts = torch.from_numpy(np.array(load_train_counts(self.data_dir, "items")))
        unsharded = build_embedding_collection(cfg, self.meta.num_users, self.meta.num_items,
                                               env.device, self.meta.sparse_features)
        self.embedding_bytes = unsharded.embedding_bytes()
        self.is_cel = isinstance(unsharded, ClusteredEmbeddingBagCollection)
        # synthetic data: planted clusters to score against (cel.init_from_planted installs them)
        self.planted = setup_planted(cfg, self.data_dir, unsharded)
        if cfg.model.name in CTR_MODELS:       # every categorical feature, the dense ones
            features = [f for _, f, _ in table_specs(cfg, self.meta.num_users, self.meta.num_items,
                                                       self.meta.sparse_features)]
            self.model = build_model(cfg.model, num_dense=len(self.meta.dense_features),
                                     seed=cfg.train.seed, features=features).to(env.device)
        else:
            self.model = build_model(cfg.model, seed=cfg.train.seed).to(env.device)
        # bpr / softmax: sampled negatives and ranking metrics over the catalogue
        self.retrieval = self.ranking = None
        if is_retrieval(cfg.train.loss):
            check_retrieval_config(cfg, self.meta.sparse_features)
            self.retrieval = RetrievalObjective(cfg.train.loss, self.meta.num_items,
                                                cfg.train.negatives, self.item_counts,
                                                seed=cfg.train.seed + 2)
            self.ranking = self._ranking_evaluator("val")
        if hasattr(self.model, "set_global_bias") and cfg.train.loss == "mse":
            self.model.set_global_bias(self._train_label_mean())
        elif cfg.model.name in (*CTR_MODELS, "gmf") and cfg.train.loss == "bce":   # base rate logit
            rate = min(max(self._train_label_mean(), 1e-6), 1 - 1e-6)
            self.model.set_global_bias(math.log(rate / (1 - rate)))
        # fused FBGEMM tables (sharded by DMP, on 1 rank for one process) or a torch optimizer
        self.tables = choose_table_update(cfg, env.device, env.world_size, unsharded)
        if env.is_main:
            print(self.tables.describe(env.world_size, cfg.dist.sharding), flush=True)
        if self.tables.sharded:
            if not env.distributed:
                self.env = env = init_single_process_group(env, cfg.dist.backend)
            # self.emb: what the forward pass calls; self.cel: what cluster phases drive
            self.emb, self.cel = self._shard(unsharded)
        else:
            self.emb = unsharded
            self.cel = unsharded if self.is_cel else None
        self.optimizer = self._optimizer()
        self.schedule = ClusterSchedule(
            split_interval=cfg.cel.split_interval, split_until=cfg.cel.split_until,
            reassign_rule="every" if cfg.cel.reassign_per_epoch else cfg.cel.reassign_rule,
            reassign_period=self._reassign_period(),
            reassign_at=tuple(cfg.cel.reassign_at) if cfg.cel.reassign_at is not None else None,
            unit=cfg.cel.interval_unit, freeze_after=cfg.cel.freeze_after)
        self.generator = torch.Generator().manual_seed(cfg.train.seed + 1)
        self.train_source = self._source("train", cfg.data.batch_size, shuffle=True)
        self.val_source = self._source("val", cfg.data.eval_batch_size, shuffle=False)
        # the reassignment pass reads this rank's training share in large, unshuffled batches
        self.reassign_source = local_source(self.data_dir / "train", cfg.data.eval_batch_size,
                                            env, shuffle=False, seed=cfg.train.seed)
        self.reassign_mode = resolve_reassign_mode(cfg.cel.reassign_mode, self.cel)
        self.recent = (RecentInteractions(cfg.cel.lite_buffer_samples)
                       if self.reassign_mode == "lite" else None)
        ray = self.ray_ctx
        self.checkpoints = CheckpointClient(
            self.run_dir, env,
            report=(lambda m, d: ray.report(m, checkpoint_dir=d)) if ray is not None else None,
            latest_reported=ray.latest_checkpoint_dir if ray is not None else None)
        self.jsonl_phases = self.run_dir / "phases.jsonl"
        if env.is_main and self.checkpoints.resume_candidate(cfg.run.resume) is None:
            # a fresh run in a reused RUN_DIR starts its logs afresh (a resumed one appends)
            for stale in (self.jsonl_phases, self.run_dir / "metrics.jsonl"):
                stale.unlink(missing_ok=True)
        self.logger = build_loggers(cfg.tracking, str(self.run_dir), config_to_dict(cfg), env.rank)
        self.logger.log_config(config_to_dict(cfg))
        resumed = self._maybe_resume()
        if self.is_cel and not resumed:
            for table in self.cel.clustered_tables:
                self._open_split_window(table)
        if env.is_main:
            print(f"[train] run dir {self.run_dir}  data {self.data_dir}  "
                  f"users {self.meta.num_users:,} items {self.meta.num_items:,} "
                  f"train rows {self.meta.splits.get('train', 0):,}  method {cfg.embedding.method} "
                  f"model {cfg.model.name}  embedding bytes {self.embedding_bytes:,}"
                  + (f"  ranks {env.world_size} ({env.backend}, {cfg.dist.sharding}"
                     + (f", batch_scope {self.cel.batch_scope}" if self.cel is not None else "") + ")"
                     if env.distributed else "")
                  + ("  (resumed at step %d)" % self.step if resumed else ""), flush=True)

    def _run_dir(self) -> pathlib.Path:
        name = self.cfg.run.name or time.strftime("run-%Y%m%d-%H%M%S")
        path = pathlib.Path(self.cfg.run.dir) / name
        if self.env.is_main:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def _source(self, split: str, batch_size: int, shuffle: bool) -> BatchSource:
        if self.ray_ctx is not None and split == "train" and self.cfg.data.reader == "ray":
            return BatchSource(lambda epoch: self.ray_ctx.iter_batches(split, batch_size, epoch),
                               self.env.device)
        # training: equal row counts per rank (a row-wise sharded backward on gloo failed on
        # last batches of 185 and 186 rows); evaluation reads every row once
        return local_source(self.data_dir / split, batch_size, self.env, shuffle, self.cfg.train.seed,
                            equal_shares=split == "train")

    def _train_label_mean(self) -> float:
        import pyarrow.dataset as ds
        labels = ds.dataset(str(self.data_dir / "train"), format="parquet").to_table(
            columns=["label"]).column("label").to_numpy()
        return float(np.mean(labels)) if labels.size else 0.0

    def _shard(self, unsharded: torch.nn.Module):
        """Shard the embedding collection over the process group (TorchRec planner + CEL
        sharder, FBGEMM's fused optimizer for the tables; one rank for a single process) from
        the unsharded module's exact weights. Full tables become a stock EBC (the stock sharder
        matches the exact type); hash / QR collections keep their remap and DMP shards the
        stock EBC inside them."""
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        from cel_torchrec.distributed import clustered_modules, load_unsharded_state, shard_model
        cfg = self.cfg
        state = {k: v.detach().cpu().clone() for k, v in unsharded.state_dict().items()}
        if isinstance(unsharded, FullEmbeddingBagCollection):
            unsharded = EmbeddingBagCollection(tables=unsharded.embedding_bag_configs(),
                                               device=torch.device("meta"))
        dmp = shard_model(unsharded, sharding_type=cfg.dist.sharding,
                          fused_params=self.tables.fused_params(cfg.train.lr),
                          device=self.env.device, batch_scope=cfg.dist.batch_scope)
        load_unsharded_state(dmp, state)
        if self.env.distributed:     # one rank: nothing to average
            self.model = torch.nn.parallel.DistributedDataParallel(self.model)
        cel = next(iter(clustered_modules(dmp).values()), None)
        return dmp, cel

    @property
    def interaction_model(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    def _optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer of the interaction model, plus the tables where they are not
        fused: the unsharded collection's, or a sharded one's data-parallel (dense) tables.
        Fused tables update in backward and are left out."""
        from torchrec.optim.optimizers import in_backward_optimizer_filter
        t = self.cfg.train
        params = list(self.model.parameters())
        if self.tables.sharded:
            params += [p for _, p in in_backward_optimizer_filter(self.emb.named_parameters())]
        else:
            params += list(self.emb.parameters())
        if t.optimizer == "adam":
            return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
        if t.optimizer == "adagrad":
            return torch.optim.Adagrad(params, lr=t.lr, weight_decay=t.weight_decay)
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
        raise ValueError(f"train.optimizer must be adam|adagrad|sgd, got {t.optimizer!r}")

    # ------------------------------------------------------------------ train
    def train(self) -> dict:
        cfg, env = self.cfg, self.env
        max_steps = cfg.train.max_steps
        log_every = cfg.tracking.log_every_steps
        t_start = time.perf_counter()
        samples = 0
        while self.epoch < cfg.train.epochs and (max_steps is None or self.step < max_steps):
            self.emb.train(), self.model.train()
            # the losses stay on the device: read on the host only when logged (no sync a step)
            epoch_loss, epoch_batches = torch.zeros(()), 0
            batches = synchronised(self.train_source.epoch(self.epoch), self.env)
            for kjt, dense, label in self._bar(batches, f"epoch {self.epoch + 1}/{cfg.train.epochs}",
                                               self._epoch_steps()):
                loss = self._train_step(kjt, dense, label)
                epoch_loss = epoch_loss.to(loss.device) + loss
                epoch_batches += 1
                samples += label.numel() * env.world_size
                self.step += 1
                if self.cfg.cel.interval_unit == "step":
                    self._cluster_phases(self.step)
                if log_every and self.step % log_every == 0:
                    elapsed = time.perf_counter() - t_start
                    if self.cel is not None:       # the input checks deferred off the step
                        self.cel.check_inputs()
                    self.logger.log({"train_loss": float(loss), "epoch": self.epoch,
                                     "samples_per_s": samples / max(elapsed, 1e-9),
                                     **self._cluster_counts(), **self._phase_totals},
                                    step=self.step)
                if cfg.train.eval_every_steps and self.step % cfg.train.eval_every_steps == 0:
                    self._log_eval()
                if cfg.run.checkpoint_every_steps and self.step % cfg.run.checkpoint_every_steps == 0:
                    self.save_checkpoint()
                if max_steps is not None and self.step >= max_steps:
                    break
            self.epoch += 1
            if self.cfg.cel.interval_unit == "epoch":
                self._cluster_phases(self.epoch)
            self._method_epoch_end()
            self.train_seconds += time.perf_counter() - t_start   # evaluation is not counted
            val = self._log_eval(extra={"train_loss_epoch": float(epoch_loss) / max(epoch_batches, 1)})
            self.save_checkpoint(report_metrics=val)
            t_start = time.perf_counter()
            samples = 0
        return self.finish()

    def _train_step(self, kjt, dense, label) -> torch.Tensor:
        """One optimizer step; returns the batch's mean loss, detached, on the device."""
        if self.retrieval is not None:       # positives (label > 0), widened with negatives
            label = (label > 0).to(label.dtype)
            seen = (kjt, dense, label)
            kjt, dense, label = self.retrieval.training_batch(kjt, dense, label)
            embs = self.emb(kjt).to_dict()
            loss, losses = self.retrieval.losses(self.model, kjt, embs, dense, label)
        else:
            embs = self.emb(kjt).to_dict()
            pred = self.model(embs, dense)
            losses = per_sample_loss(pred, label, self.cfg.train.loss)
            loss = losses.mean()
        if self.cfg.train.l2:
            loss = loss + self.cfg.train.l2 * sum((e * e).sum(1).mean() for e in embs.values())
        penalty = self.method_hook("penalty")            # CERP's regulariser
        if penalty is not None:
            loss = loss + penalty
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method_hook("after_step", self.step + 1)    # CERP's budget mask refresh
        if self.cel is not None:
            self.cel.observe_losses(losses.detach())
        if self.recent is not None:          # CEL-Lite scores on the batches since the last pass
            self.recent.add(*(self.retrieval.pointwise(*seen) if self.retrieval is not None
                              else (kjt, dense, label)))
        return loss.detach()

    def method_hook(self, name: str, *args):
        """Call the embedding collection's hook `name` where it has one (the compact methods'
        `penalty`, `after_step`, `after_epoch`: `cel_torchrec.modules.compact`); else None."""
        fn = getattr(getattr(self.emb, "module", self.emb), name, None)
        return fn(*args) if fn is not None else None

    def _method_epoch_end(self) -> None:
        """The collection's epoch-end step (CCE's clustering), timed and logged as a phase."""
        t0 = time.perf_counter()
        report = self.method_hook("after_epoch", self.epoch, self.cfg.train.epochs, self.optimizer)
        if report:
            seconds, kind = time.perf_counter() - t0, f"{self.cfg.embedding.method}_epoch_end"
            self._phase_totals[f"{kind}_seconds"] = self._phase_totals.get(f"{kind}_seconds", 0.0) + seconds
            if self.env.is_main:
                with open(self.jsonl_phases, "a") as f:
                    f.write(json.dumps({"step": self.step, "epoch": self.epoch, "kind": kind,
                                        "table": ",".join(report), "seconds": seconds,
                                        "detail": report}) + "\n")

    def _epoch_steps(self) -> int:
        """Training steps per epoch (every rank takes the same number)."""
        global_batch = self.cfg.data.batch_size * self.env.world_size
        return max(1, -(-self.meta.splits.get("train", 0) // global_batch))

    def _bar(self, iterable, desc: str, total: int | None = None):
        """`iterable` with a progress bar on rank 0 (`tracking.progress`; see trainer.progress)."""
        return progress(iterable, desc=desc, total=total, enabled=self.cfg.tracking.progress,
                        rank=self.env.rank)

    def _reassign_period(self) -> int:
        """`cel.reassign_period`, or with `cel.reassign_per_epoch` the steps between
        reassignments that give that many per epoch (so a config keeps its phase cost per epoch
        on a dataset 10x larger, instead of reassigning 10x as often)."""
        per_epoch = self.cfg.cel.reassign_per_epoch
        if not per_epoch:
            return self.cfg.cel.reassign_period
        if per_epoch < 0:
            raise ValueError(f"cel.reassign_per_epoch must be > 0, got {per_epoch}")
        if self.cfg.cel.interval_unit != "step":
            raise ValueError("cel.reassign_per_epoch needs cel.interval_unit=step")
        return max(1, round(self._epoch_steps() / per_epoch))

    def _open_split_window(self, table: str) -> None:
        """Open `table`'s next split window; with `cel.split_coverage`, note the step at which
        it closes (its candidates' members seen `split_coverage` times on average)."""
        candidates = self.cel.begin_split_window(table)
        coverage = self.cfg.cel.split_coverage
        if coverage > 0:
            global_batch = self.cfg.data.batch_size * self.env.world_size
            self.split_due[table] = self.step + coverage_window_steps(
                self.cel.cluster_states[table], candidates, coverage, global_batch,
                self._epoch_steps())

    def _split_now(self, table: str, t: int, actions) -> bool:
        state = self.cel.cluster_states[table]
        if state.num_active >= state.capacity:
            return False
        if self.cfg.cel.split_coverage > 0 and self.cfg.cel.interval_unit == "step":
            frozen = self.schedule.freeze_after is not None and t >= self.schedule.freeze_after
            return (not frozen and t < self.schedule.split_until
                    and self.step >= self.split_due.get(table, 0))
        return SPLIT in actions

    def _cluster_phases(self, t: int) -> None:
        if self.cel is None:
            return
        actions = self.schedule.actions(t)
        split_tables = [tb for tb in self.cel.clustered_tables if self._split_now(tb, t, actions)]
        if not actions and not split_tables:
            return
        reports = []
        recent = None
        # windows and the Lite buffer are at their fullest right before the phases
        self.state_bytes_peak = max(self.state_bytes_peak, self.embedding_state_bytes())
        if REASSIGN in actions and self.recent is not None:
            recent = list(padded(iter(self.recent), self.env))     # equal batch counts on every rank
            if self.retrieval is not None:   # the users' log-normalisers, as of now
                offsets = self.retrieval.phase_offsets(self.emb, self.interaction_model,
                                                       self.meta.num_users, self.env.device)
                recent = list(self.retrieval.with_offsets(recent, self.emb,
                                                          self.interaction_model, offsets))
        # exact: each table split then reassigned in turn; Lite: every split, then one shared
        # pass proposes every table's moves
        lite = self.reassign_mode == "lite"
        groups = ([self.cel.clustered_tables] if lite else
                  [[tb] for tb in self.cel.clustered_tables])
        for group in groups:
            for table in group:
                if table in split_tables:
                    reports.append(run_split(self.cel, table, self.optimizer,
                                             reopen=lambda tb=table: self._open_split_window(tb)))
            if REASSIGN in actions:
                reports += [rep for _, rep in run_reassignments(
                    self.cel, self.phase_model,
                    self._reassign_batches(group), group,
                    loss=self.phase_loss, env=self.env,
                    keep_prob=self.cfg.cel.reassign_keep_prob, generator=self.generator,
                    optimizer=self.optimizer, mode=self.reassign_mode, recent=recent,
                    lite_k=self.cfg.cel.lite_k, lite_scoring=self.cfg.cel.lite_scoring,
                    min_gain=self.cfg.cel.reassign_min_gain)]
        if REASSIGN in actions and self.recent is not None:
            self.recent.clear()
        for rep in reports:
            self.phase_seconds[rep.kind] += rep.seconds
            if self.env.is_main:
                with open(self.jsonl_phases, "a") as f:
                    f.write(json.dumps({"step": self.step, "epoch": self.epoch, "kind": rep.kind,
                                        "table": rep.table, "seconds": rep.seconds,
                                        "num_clusters": rep.num_clusters, **rep.detail}) + "\n")
        for rep in reports:     # per-event detail goes to phases.jsonl; totals to the logger
            key = f"{rep.kind}_seconds_{_config_key(rep.table)}"
            self._phase_totals[key] = self._phase_totals.get(key, 0.0) + rep.seconds

    @property
    def phase_model(self) -> torch.nn.Module:
        """What the reassignment scores: the interaction model, or for the ranking losses its
        calibrated logit (trainer.retrieval.CalibratedScores)."""
        if self.retrieval is None:
            return self.interaction_model
        return CalibratedScores(self.interaction_model)

    @property
    def phase_loss(self) -> str:
        """The per-sample loss the cluster phases score: the training loss, or for the ranking
        losses their pointwise surrogate (logistic loss over sampled negatives)."""
        return "bce" if self.retrieval is not None else self.cfg.train.loss

    def _reassign_batches(self, tables=()):
        """A callable giving the reassignment pass's batches (each rank's training share;
        retrieval: widened with sampled negatives), with a progress bar."""
        desc = " ".join(["reassign", *tables])
        if self.retrieval is None:
            return lambda: self._bar(padded(self.reassign_source.epoch(0), self.env), desc)
        return lambda: self.retrieval.reassign_batches(
            self._bar(padded(self.reassign_source.epoch(0), self.env), desc), self.emb,
            self.interaction_model, self.meta.num_users, self.env.device)

    def _ranking_evaluator(self, split: str) -> RankingEvaluator:
        return RankingEvaluator(self.data_dir, split, self.meta.num_users, self.meta.num_items,
                                self.user_counts.numpy(), self.item_counts.numpy(),
                                self.cfg.data.cold_threshold,
                                max_users=self.cfg.train.ranking_eval_users,
                                seed=self.cfg.train.seed)

    def embedding_state_bytes(self) -> int:
        """This rank's bytes of entity-dependent training state, counted once per storage: the
        embedding collection's tensors (tables; FBGEMM's fused optimizer state, which its
        modules hold; assignment maps; counters), the torch optimizer's state for unfused
        tables, the split windows and the CEL-Lite buffer. Not included: the transient
        per-phase work buffers (exact reassignment's loss blocks, within a 256 MiB budget)."""
        storages: dict = {}

        def add(t) -> None:
            if torch.is_tensor(t) and t.device.type != "meta" and t.numel():
                st = t.untyped_storage()
                storages[(str(t.device), st.data_ptr())] = st.nbytes()

        # TorchRec's sharded modules keep their FBGEMM kernels (weights, momentum) in `_lookups`,
        # outside the module tree
        # outside the module tree, and their parameters() show only views of the weights
        mods = [*self.emb.modules()] + [sub for m in self.emb.modules()
                                         for lk in (getattr(m, "_lookups", None) or ())
                                         for sub in lk.modules()]
        for mod in mods:
            for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)):
                add(t)
        if not self.tables.fused:
            for p in self.emb.parameters():
                for v in self.optimizer.state.get(p, {}).values():
                    add(v)
        if self.cel is not None:
            for w in getattr(self.cel, "_windows", {}).values():
                for v in vars(w).values():
                    add(v)
        if self.recent is not None:
            for kjt, dense, label in iter(self.recent):
                for t in (kjt.values(), kjt.lengths(), kjt.weights_or_none(), dense, label):
                    add(t)
        return int(sum(storages.values()))

    def _cluster_counts(self) -> dict:
        if self.cel is None:
            return {}
        return {f"num_clusters_{_config_key(t)}": self.cel.cluster_states[t].num_active
                for t in self.cel.clustered_tables}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict:
        self.emb.eval(), self.model.eval()
        if self.retrieval is not None:       # ranking over the catalogue, training items out
            ranking = self.ranking if split == "val" else self._ranking_evaluator(split)
            metrics = ranking.evaluate(self.emb, self.interaction_model, self.env, self.env.device)
            self.emb.train(), self.model.train()
            return {f"{split}_{k}": v for k, v in metrics.items()}
        acc = MetricAccumulator(kind="rating" if self.cfg.train.loss == "mse" else "click",
                                user_train_counts=self.user_counts,
                                item_train_counts=self.item_counts,
                                cold_threshold=self.cfg.data.cold_threshold)
        source = self.val_source if split == "val" else self._source(split, self.cfg.data.eval_batch_size, False)
        for kjt, dense, label, valid in self._bar(padded(source.epoch(0), self.env), f"eval {split}"):
            pred = self.interaction_model(self.emb(kjt).to_dict(), dense)
            if valid:
                acc.update(pred.cpu(), label.cpu(), kjt["user_id"].values().cpu(),
                           kjt["item_id"].values().cpu())
        metrics = acc.compute()
        if self.env.distributed:
            metrics = self._reduce_eval(acc)
        self.emb.train(), self.model.train()
        return {f"{split}_{k}": v for k, v in metrics.items()}

    def _reduce_eval(self, acc) -> dict:
        """Combine ranks' evaluation shares by gathering predictions (evaluation is small)."""
        import torch.distributed as dist
        gathered = [None] * self.env.world_size
        dist.all_gather_object(gathered, acc.state())
        return type(acc).from_states(gathered).compute()

    def _log_eval(self, extra: dict | None = None) -> dict:
        val = self.evaluate("val")
        record = {**val, **(extra or {}), "epoch": self.epoch,
                  "train_time_s": self.train_seconds,
                  "embedding_bytes": self.embedding_bytes, **self._cluster_counts()}
        if self.cel is not None:
            for t in self.cel.clustered_tables:
                st = self.cel.cluster_states[t]
                hist = cluster_size_histogram(st.assignment, st.num_active)
                record[f"cluster_sizes_{_config_key(t)}"] = hist.get("sizes", [])
        self.logger.log(record, step=self.step)
        self.history.append({k: v for k, v in record.items() if not isinstance(v, (list, tuple))})
        return val

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict:
        """Everything but the sharded tables (which DCP writes per rank). Collective when the
        split windows are sharded: call on every rank."""
        state = {"model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "step": self.step, "epoch": self.epoch,
                 "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                 "phase_seconds": self.phase_seconds, "train_seconds": self.train_seconds,
                 "history": self.history, "windows": self._window_state(),
                 "split_due": dict(self.split_due),
                 "world_size": self.env.world_size, "tables": self._tables_tag(),
                 # what trainer.export needs to rebuild the run without its YAML
                 "config": config_to_dict(self.cfg), "commit": self.commit,
                 "data_dir": str(self.data_dir.resolve())}
        if not self.tables.sharded:
            state["emb"] = self.emb.state_dict()   # tables + cluster state (assignment, counters)
        return state

    def _tables_tag(self) -> str:
        """How a checkpoint holds the tables: `sharded` (DCP, with the fused optimizer's state)
        or `torch` (in state.pt, their optimizer state inside the torch optimizer's)."""
        return "sharded" if self.tables.sharded else "torch"

    def _window_state(self) -> dict:
        if self.cel is None:
            return {}
        out = {}
        for t in self.cel.clustered_tables:
            cand, entities, grads, counts = self.cel.window_rows(t)
            out[t] = {"candidates": cand.cpu(), "entities": entities.cpu(), "grads": grads.cpu(),
                      "counts": counts.cpu()}
        return out

    def save_checkpoint(self, report_metrics: dict | None = None) -> pathlib.Path | None:
        """Collective. The model, optimizer, progress, RNG and the cluster state (maps, counters,
        open split windows); sharded runs add the tables and fused optimizer state (DCP), CEL-Lite
        runs each rank's buffer of recent batches. Atomic (see `trainer.checkpointing`)."""
        state = self.checkpoint_state()
        write_sharded = None
        if self.tables.sharded:
            from cel_torchrec.distributed import save_checkpoint as save_sharded
            write_sharded = lambda d: save_sharded(self.emb, str(d))   # noqa: E731
        return self.checkpoints.save(
            state, {"step": self.step, "epoch": self.epoch, "world_size": self.env.world_size,
                    "cluster_state": self.cluster_digest()},
            write_sharded=write_sharded,
            rank_files={"lite_recent": self.recent.state_dict()} if self.recent is not None else None,
            report_metrics={**(report_metrics or {}), "step": self.step, "epoch": self.epoch})

    def _maybe_resume(self) -> bool:
        d = self.checkpoints.resume_candidate(self.cfg.run.resume)
        if d is None:
            return False
        self.load_checkpoint(d)
        self.checkpoints.verify_resumed(d, self.cluster_digest(), self.step, self.epoch)
        return True

    def cluster_digest(self) -> dict:
        """Per clustered table: active clusters and a SHA-1 of the assignment map (written with
        every checkpoint, checked on resume, so a restart provably keeps the cluster state)."""
        if self.cel is None:
            return {}
        import hashlib
        return {t: {"num_active": st.num_active,
                    "assignment_sha1": hashlib.sha1(st.assignment.cpu().numpy().tobytes()).hexdigest()}
                for t, st in ((t, self.cel.cluster_states[t]) for t in self.cel.clustered_tables)}

    def load_checkpoint(self, directory: pathlib.Path) -> None:
        state = self.checkpoints.load(directory)
        if state.get("world_size", 1) != self.env.world_size:
            raise ValueError(
                f"{directory}: checkpoint written by {state.get('world_size', 1)} processes, this run "
                f"has {self.env.world_size}; resume with the same world size, or export the tables "
                f"with cel_torchrec.distributed.export_unsharded_state (see README)")
        saved = state.get("tables", "torch" if "emb" in state else "sharded")
        if saved != self._tables_tag():
            raise ValueError(
                f"{directory}: checkpoint holds {saved} tables, this run has {self._tables_tag()} "
                f"ones ({self.tables.kind}); "
                f"resume with the train.fused_tables / train.optimizer it was written with")
        if self.tables.sharded:
            from cel_torchrec.distributed import load_checkpoint as load_sharded
            load_sharded(self.emb, str(directory / "sharded"))
        else:
            self.emb.load_state_dict(state["emb"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.phase_seconds = state["phase_seconds"]
        self.train_seconds = state["train_seconds"]
        self.history = state["history"]
        self.split_due = dict(state.get("split_due", {}))
        if self.cel is not None:
            for t, w in state["windows"].items():
                self.cel.restore_split_window(t, w["candidates"], w["entities"], w["grads"],
                                              w.get("counts"))
        if self.recent is not None:
            buffered = self.checkpoints.load_rank_file(directory, "lite_recent")
            if buffered is not None:
                self.recent.load_state_dict(buffered)
            else:                        # a checkpoint from before buffers were saved
                self.recent.clear()

    # ------------------------------------------------------------------ finish
    def finish(self) -> dict:
        final = self.evaluate("val")
        metrics = {**final,
                   "embedding_bytes": self.embedding_bytes,
                   "embedding_state_bytes": max(self.state_bytes_peak,
                                                self.embedding_state_bytes()),
                   "train_time_s": self.train_seconds,
                   "split_time_s": self.phase_seconds["split"],
                   "reassign_time_s": self.phase_seconds["reassign"],
                   "steps": self.step, "epochs": self.epoch,
                   "method": self.cfg.embedding.method, "model": self.cfg.model.name,
                   **self._cluster_counts()}
        metrics.update(planted_metrics(self.cel, self.planted,
                                       {"user": self.user_counts, "item": self.item_counts},
                                       min_interactions=self.cfg.data.cold_threshold))
        rmse_key = "val_rmse" if "val_rmse" in final else None
        if rmse_key and self.history:
            best = min((h for h in self.history if rmse_key in h), key=lambda h: h[rmse_key], default=None)
            if best:
                metrics["best_val_rmse"] = best[rmse_key]
                metrics["best_val_rmse_cold"] = best.get("val_rmse_cold")
                metrics["time_to_best_s"] = best.get("train_time_s")
                metrics["best_epoch"] = best.get("epoch")
        if "val_recall_at_20" in final and self.history:   # retrieval: best epoch by recall@20
            scored = [h for h in self.history if _finite(h.get("val_recall_at_20"))]
            best = max(scored, key=lambda h: h["val_recall_at_20"], default=None)
            if best:
                for k in ("recall_at_20", "ndcg_at_20", "recall_at_20_cold_items",
                          "recall_at_20_cold_users"):
                    metrics[f"best_val_{k}"] = best.get(f"val_{k}")
                metrics["time_to_best_s"] = best.get("train_time_s")
                metrics["best_epoch"] = best.get("epoch")
        if self.env.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")
        self.logger.log_summary(metrics)
        return metrics

    def cleanup(self) -> None:
        self.logger.close()
        detach_run_log(getattr(self, "_run_log", None))


def _config_key(table: str) -> str:
    """How metrics name a table: `users` / `items`, a CTR feature by its own name."""
    return CONFIG_KEY_OF_TABLE.get(table, table)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out
