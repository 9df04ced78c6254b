"""`run_worker(config)`: the one worker function behind `python -m trainer.main`, torchrun,
Ray Train and the tests."""
from __future__ import annotations

from typing import Any

from trainer.config import TrainConfig
from trainer.dist import DistEnv, init_distributed, shutdown_distributed
from trainer.logs import quiet_console
from trainer.loop import TrainRecipe
from trainer.progress import close_progress


def run_worker(cfg: TrainConfig, ray_ctx: Any = None) -> dict:
    """Join the process group if launched as several processes, train, evaluate, and return the
    final metrics (rank 0 also writes RUN_DIR/metrics.json)."""
    if cfg.train.num_threads > 0:
        import torch
        torch.set_num_threads(cfg.train.num_threads)
    quiet_console(cfg.tracking.verbose)
    env = init_distributed(cfg.dist.backend)
    try:
        return _train(cfg, env, ray_ctx)      # the recipe (model, process-group users) dies here
    finally:
        shutdown_distributed(env)


def _train(cfg: TrainConfig, env: DistEnv, ray_ctx: Any) -> dict:
    recipe = TrainRecipe(cfg, env, ray_ctx=ray_ctx)
    recipe.setup()
    try:
        metrics = recipe.train()
        close_progress(f"trained {recipe.epoch} epochs", recipe.step)   # Ray: its one line
    finally:
        close_progress()         # a Ray-rendered bar: closed before the run's last lines
        recipe.cleanup()
    if env.is_main:
        print(f"[train] metrics written to {recipe.run_dir / 'metrics.json'}", flush=True)
    return metrics


def ray_worker_entry(config: dict, ctx: Any) -> dict:
    """Ray Train's per-worker entry (see jobs.ray_train): the same worker, fed by Ray Data shards
    and reporting checkpoints through `ctx`."""
    from trainer.config import TrainConfig
    return run_worker(TrainConfig.from_dict(config), ray_ctx=ctx)
