"""A run's checkpoints on disk: the atomic layout (written to `checkpoint.tmp/`, renamed over
`checkpoint/`), which checkpoint a run resumes from, and the proof that a resume kept the cluster
state (`resumes.jsonl`). The recipe (`trainer.loop.TrainRecipe`) decides what goes in and applies
what comes out; Ray Train's reporting comes in as callbacks, so this module knows no Ray.

Layout of `RUN_DIR/checkpoint/`:
- `state.pt` (rank 0): model, optimizer, progress, RNG, cluster state and split windows;
- `meta.json` (rank 0): step, epoch, world size and a digest of the cluster state;
- `sharded/` (every rank): the DCP checkpoint of sharded tables and fused optimizer state;
- `<name>_rank<r>.pt` (every rank): per-rank state, e.g. the CEL-Lite buffer of recent batches.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
from typing import Any, Callable

import torch

from trainer.dist import DistEnv, barrier


def code_commit() -> str:
    """The git commit of the code this process runs (short hash), or "unknown" outside a
    checkout; recorded in checkpoints and exports as the training commit."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=pathlib.Path(__file__).resolve().parent,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


class CheckpointClient:
    """Saves and finds one run's checkpoints. `report(metrics, checkpoint_dir_or_None)` is called
    after each save on every rank (Ray Train: `ray_ctx.report`, rank 0 passing the directory);
    `latest_reported()` gives the checkpoint a restarted worker group should resume from."""

    def __init__(self, run_dir: pathlib.Path, env: DistEnv,
                 report: Callable[[dict, str | None], None] | None = None,
                 latest_reported: Callable[[], str | None] | None = None):
        self.run_dir = pathlib.Path(run_dir)
        self.env = env
        self._report = report
        self._latest_reported = latest_reported

    @property
    def directory(self) -> pathlib.Path:
        return self.run_dir / "checkpoint"

    def save(self, state: dict, meta: dict, *,
             write_sharded: Callable[[pathlib.Path], None] | None = None,
             rank_files: dict[str, Any] | None = None,
             report_metrics: dict | None = None) -> pathlib.Path:
        """Collective. Write `state` and `meta` (rank 0), the sharded part (`write_sharded(dir)`,
        every rank) and each rank's `rank_files`, then swap the new checkpoint in atomically: a
        crash at any point leaves the previous checkpoint (or, mid-swap, `checkpoint.old`)."""
        path = self.directory
        tmp = path.with_name("checkpoint.tmp")
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.env)
        if write_sharded is not None:
            write_sharded(tmp / "sharded")
        if rank_files:
            for name, obj in rank_files.items():
                torch.save(obj, tmp / f"{name}_rank{self.env.rank}.pt")
            barrier(self.env)            # all written before rank 0 renames the directory
        if self.env.is_main:
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps(meta))
            old = path.with_name("checkpoint.old")
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        barrier(self.env)
        if self._report is not None:
            self._report(report_metrics or {}, str(path) if self.env.is_main else None)
        return path

    def resume_candidate(self, resume: bool) -> pathlib.Path | None:
        """The checkpoint to resume from: the one last reported (a restarted Ray worker group),
        else this run directory's when `resume`; None for a fresh run."""
        candidates = []
        if self._latest_reported is not None:
            d = self._latest_reported()
            if d:
                candidates.append(pathlib.Path(d))
        if resume:
            candidates.append(self.directory)
        return next((d for d in candidates if (d / "state.pt").exists()), None)

    def load(self, directory: pathlib.Path) -> dict:
        return torch.load(directory / "state.pt", map_location=self.env.device, weights_only=False)

    def load_rank_file(self, directory: pathlib.Path, name: str) -> Any | None:
        """This rank's `name` state, or None (a checkpoint written before it was saved)."""
        path = directory / f"{name}_rank{self.env.rank}.pt"
        return torch.load(path, weights_only=False) if path.exists() else None

    def verify_resumed(self, directory: pathlib.Path, cluster_state: dict, step: int,
                       epoch: int) -> None:
        """Raise unless the loaded cluster state equals the one the checkpoint recorded; log the
        resume to `resumes.jsonl`."""
        meta_file = directory / "meta.json"
        saved = json.loads(meta_file.read_text()).get("cluster_state") if meta_file.exists() else None
        if saved is not None and saved != cluster_state:
            raise RuntimeError(f"{directory}: cluster state after loading differs from the one saved")
        if self.env.is_main:
            with open(self.run_dir / "resumes.jsonl", "a") as f:
                f.write(json.dumps({"from": str(directory), "step": step, "epoch": epoch,
                                    "cluster_state": cluster_state,
                                    "verified": saved is not None}) + "\n")
