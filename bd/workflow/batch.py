"""Several ``bd`` commands in one process: what the workflow's batch rules run.

A ``bd train`` or ``bd evaluate`` call spends about 3-5 CPU s importing torch, pandas and the
package and reading the cohort before it trains for a second or two on a small cohort such as the
demo's; with 40-odd runs that start-up cost more than the training. ``bd batch --jobs FILE`` runs
the commands listed in FILE (JSON lines ``{"argv": [...], "log": PATH}``) one after another in this
process, each with its own log file (its stdout, stderr and log records), so the imports are paid
once, and each feature store is read once (bd.features.store.cached_reads). Each command is exactly the one the per-run rule runs; the first that fails stops the batch
with its exit status, naming its log. Commands seed themselves (``bd train`` seeds torch and numpy
per run), so a run's result does not depend on the runs before it in the batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from bd.errors import BDError


def read_jobs(path: Path) -> list[dict[str, Any]]:
    """The jobs file: one JSON object a line with ``argv`` (a list of strings) and ``log``."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise BDError(f"--jobs {path}: {exc.strerror or exc}") from exc
    jobs = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BDError(f"--jobs {path}: line {i}: not JSON ({exc.msg})") from exc
        if not isinstance(job.get("argv"), list) or not job["argv"] or not isinstance(job.get("log"), str):
            raise BDError(f"--jobs {path}: line {i}: needs 'argv' (a non-empty list) and 'log' (a path)")
        if job["argv"][0] == "batch":
            raise BDError(f"--jobs {path}: line {i}: a batch cannot run another batch")
        jobs.append({"argv": [str(a) for a in job["argv"]], "log": job["log"]})
    return jobs


@contextlib.contextmanager
def logged_to(path: Path):
    """Send stdout, stderr and the root logger's records to ``path`` for the duration."""
    from bd import cli

    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    with path.open("w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter(cli.LOG_FORMAT, datefmt=cli.LOG_DATEFMT))
        saved = root.handlers[:]
        root.handlers = [handler]
        try:
            yield
        finally:
            root.handlers = saved


def run_jobs(jobs: list[dict[str, Any]]) -> int:
    """Run the jobs in turn (each feature store read once, see cached_reads); the exit status of
    the first that fails, else 0."""
    from bd.features.store import cached_reads

    with cached_reads():
        return _run_in_turn(jobs)


def _run_in_turn(jobs: list[dict[str, Any]]) -> int:
    from bd import cli

    for i, job in enumerate(jobs, start=1):
        with logged_to(Path(job["log"])):
            try:
                code = cli.main(job["argv"])
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 2
        if code:
            print(f"bd batch: job {i} of {len(jobs)} (bd {' '.join(job['argv'][:1])}) failed with status {code}; "
                  f"see {job['log']}", file=sys.stderr)
            return code
        print(f"bd batch: job {i} of {len(jobs)} done (bd {job['argv'][0]}, log {job['log']})")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", required=True, type=Path,
                        help='JSON lines {"argv": ["train", ...], "log": "path.log"}, run in turn')


def run(args: argparse.Namespace) -> int:
    return run_jobs(read_jobs(args.jobs))
