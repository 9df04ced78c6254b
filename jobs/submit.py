"""Submit a training run to a Ray cluster as a Ray job, and follow its logs.

    python -m jobs.submit --address http://head:8265 --config configs/x.yaml [key=value ...]
    python -m jobs.submit --address http://127.0.0.1:8265 --config configs/x.yaml --dry-run
    python -m jobs.submit --address http://head:8265 --entrypoint "python -m trainer.main ..."

The repository root is shipped as the job's `working_dir` (without .venv, data, runs, wandb,
.git, bench/results); WANDB_API_KEY/WANDB_PROJECT/WANDB_ENTITY/WANDB_MODE are forwarded when
set, plus each `--env KEY` or `--env KEY=VALUE`. The default entrypoint is
`python -m jobs.ray_train --config CONFIG OVERRIDES`.

Which Python runs the job: a Ray job's entrypoint is a shell command run with the PATH of the
node's raylet, so `python` is whatever that PATH finds -- for a head started as
`.venv/bin/ray start --head` without activating the venv, that is the system Python without
torch or ray. `--python auto` (the default) therefore uses this interpreter (sys.executable)
for a head on this machine (127.0.0.1/localhost) and plain `python` (the cluster image's) for a
remote head; a leading `python`/`python3` in `--entrypoint` is replaced the same way.

Exit status: 0 job SUCCEEDED (or submitted, with --no-follow / --dry-run), 1 FAILED/STOPPED,
2 usage errors (missing config, unreachable address), 130 interrupted while following.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import sys
import time
import urllib.parse
from typing import Any, Sequence

from jobs.ray_train import QUIET_RAY_ENV

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EXCLUDES = ["/.venv/", "/data/", "/runs/", "/wandb/", "/.git/", "/bench/results/",
            "__pycache__/", "*.pyc", ".hypothesis/", ".pytest_cache/", "*.egg-info/"]
FORWARDED_ENV = ["WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE"]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
# paths the job shares with this machine, made absolute for a local head (key: default)
PATH_KEYS = {"run.dir": "runs", "data.path": None, "data.cache_dir": "data/cache"}
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


class UsageError(Exception):
    """A problem with the command line or its inputs (exit status 2)."""


def is_local_address(address: str) -> bool:
    host = urllib.parse.urlparse(address if "://" in address else f"http://{address}").hostname
    return host in LOCAL_HOSTS


def resolve_python(choice: str, address: str) -> str:
    if choice != "auto":
        return choice
    return sys.executable if is_local_address(address) else "python"


def replace_python(entrypoint: str, python: str) -> str:
    """`python -c ...` -> `<python> -c ...` (only a leading python/python3 token)."""
    head, sep, rest = entrypoint.strip().partition(" ")
    if head in ("python", "python3"):
        return shlex.quote(python) + sep + rest
    return entrypoint


def collect_env(extra: Sequence[str]) -> dict[str, str]:
    """The W&B variables that are set, then `--env KEY` (copied from here) / `KEY=VALUE`."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env["PYTHONUNBUFFERED"] = "1"          # stream the job's prints as they happen
    env.update(QUIET_RAY_ENV)                # every worker line once, not twice
    for item in extra:
        key, eq, value = item.partition("=")
        if eq:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
        else:
            raise UsageError(f"--env {key}: not set in this environment (use --env {key}=VALUE)")
    return env


def masked(env: dict[str, str]) -> dict[str, str]:
    return {k: ("***" if any(m in k.upper() for m in SECRET_MARKERS) else v)
            for k, v in env.items()}


def training_entrypoint(config_path: str, overrides: Sequence[str], python: str, local: bool,
                        working_dir: pathlib.Path) -> str:
    """`python -m jobs.ray_train --config ...`, with the config path as the job will see it and,
    for a head on this machine, relative run/data paths made absolute (the job runs in an
    unpacked copy of working_dir, so `runs/` would otherwise land inside Ray's session dir)."""
    from jobs.ray_train import get, load_config_dict
    config_file = pathlib.Path(config_path)
    if not config_file.is_file():
        raise UsageError(f"config file {config_path} not found")
    config = load_config_dict(config_file, overrides)   # validates the overrides too
    resolved = config_file.resolve()
    if resolved.is_relative_to(working_dir.resolve()):
        job_config = resolved.relative_to(working_dir.resolve()).as_posix()
    elif local:
        job_config = str(resolved)
    else:
        raise UsageError(f"{config_path} is outside the working dir {working_dir}, so it would "
                         f"not be shipped to the cluster; copy it under configs/")
    overrides = list(overrides)
    given = {o.split("=", 1)[0] for o in overrides}
    if local:
        for key, default in PATH_KEYS.items():
            value = get(config, key, default)
            if key not in given and isinstance(value, str) and value and "://" not in value \
                    and not os.path.isabs(value):
                overrides.append(f"{key}={os.path.abspath(value)}")
    args = ["-m", "jobs.ray_train", "--config", job_config, *overrides]
    return " ".join([shlex.quote(python), *map(shlex.quote, args)])


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The job as JSON-able data: entrypoint, runtime_env, submission_id, metadata."""
    local = is_local_address(args.address)
    python = resolve_python(args.python, args.address)
    working_dir = pathlib.Path(args.working_dir).resolve()
    if args.entrypoint:
        if args.config and not pathlib.Path(args.config).is_file():
            raise UsageError(f"config file {args.config} not found")
        entrypoint = replace_python(args.entrypoint, python)
    elif args.config:
        entrypoint = training_entrypoint(args.config, args.overrides, python, local, working_dir)
    else:
        raise UsageError("give --config (to train) or --entrypoint")
    spec = {"entrypoint": entrypoint,
            "runtime_env": {"working_dir": str(working_dir), "excludes": list(EXCLUDES),
                            "env_vars": collect_env(args.env)},
            "metadata": {"config": args.config or "", "submitted_by": "jobs.submit"}}
    if args.submission_id:
        spec["submission_id"] = args.submission_id
    return spec


def use_token_if_available() -> None:
    """Ray 2.60 turns token auth on for a cluster whenever a token exists (`ray.init` writes
    ~/.ray/auth_token), but a client sends it only in token mode: switch this process to token
    mode when RAY_AUTH_MODE is unset and a token is at hand (what `ray.init` does itself)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:             # a Ray without token auth
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def connect(address: str):
    use_token_if_available()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as exc:
        raise UsageError(f"{address} refused the Ray auth token: {exc}") from exc
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        raise UsageError(f"cannot reach the Ray Jobs API at {address}: {exc}\n"
                         f"(is the head running with its dashboard? `ray start --head "
                         f"--include-dashboard=true`; the dashboard needs ray[default])") from exc


def follow(client, job_id: str, poll_s: float = 1.0) -> str:
    """Stream the job's logs to stdout until it ends; returns the final status name."""
    try:
        import asyncio

        async def tail():
            async for lines in client.tail_job_logs(job_id):
                print(lines, end="", flush=True)
        asyncio.run(tail())
    except ImportError:                 # tail needs aiohttp (ray[default]); poll instead
        printed = 0
        while True:
            logs = client.get_job_logs(job_id)
            print(logs[printed:], end="", flush=True)
            printed = len(logs)
            if client.get_job_status(job_id).is_terminal():
                print(client.get_job_logs(job_id)[printed:], end="", flush=True)
                break
            time.sleep(poll_s)
    status = client.get_job_status(job_id)
    while not status.is_terminal():     # the log stream can close a moment before the status
        time.sleep(0.2)
        status = client.get_job_status(job_id)
    return str(status.value if hasattr(status, "value") else status)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address",
                        default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                        help="Ray Jobs API (dashboard) address (default $RAY_API_SERVER_ADDRESS "
                             "or %(default)s)")
    parser.add_argument("--config", help="YAML config for jobs.ray_train")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--entrypoint", help="run this command instead of jobs.ray_train")
    parser.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                        help="extra environment variable for the job (repeatable)")
    parser.add_argument("--python", default="auto",
                        help="interpreter for the entrypoint: auto (this one for a local head, "
                             "`python` for a remote one) or a path/command")
    parser.add_argument("--working-dir", default=str(REPO_ROOT), help="shipped to the job")
    parser.add_argument("--submission-id", help="job id (default: Ray picks one)")
    parser.add_argument("--dry-run", action="store_true", help="print the job spec as JSON, exit")
    parser.add_argument("--no-follow", action="store_true", help="submit and exit")
    return parser.parse_intermixed_args(argv)


def submit_with_retry(client, spec: dict, timeout_s: float = 90.0) -> str:
    """Submit; a head whose job agent is still starting answers "No available agent to submit
    job, please try again later": retry that (only that) until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**spec)
        except RuntimeError as exc:
            if "try again later" not in str(exc) or time.monotonic() > deadline:
                raise
            print("[submit] the head's job agent is not ready yet; retrying", flush=True)
            time.sleep(2.0)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = build_spec(args)
        if args.dry_run:
            shown = {**spec, "runtime_env": {**spec["runtime_env"],
                                             "env_vars": masked(spec["runtime_env"]["env_vars"])}}
            print(json.dumps({"address": args.address, **shown}, indent=2))
            return 0
        client = connect(args.address)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    job_id = submit_with_retry(client, spec)
    print(f"[submit] job {job_id} submitted to {args.address}\n[submit] entrypoint: "
          f"{spec['entrypoint']}", flush=True)
    if args.no_follow:
        print(f"[submit] follow with: ray job logs --address {args.address} --follow {job_id}")
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\n[submit] stopped following; the job goes on (ray job stop --address "
              f"{args.address} {job_id})", file=sys.stderr)
        return 130
    print(f"[submit] job {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
