"""Round jobs on a task queue, for the scale-out service: procrastinate on the same
PostgreSQL that holds the service's state (docs/architecture.md argues the choice).

`cdcca-edge cloud serve --db postgresql://... --queue` defers a cohort's round when it is
due; `cdcca-edge cloud worker --db ... --data ...` processes (any number, any machine that
mounts the data directory) run them with the same :func:`run_round` the embedded default
runs in a thread. A cohort's jobs never run at once (the job's ``lock``), and at most one
is queued while one waits or runs. A worker killed mid-round leaves its job "doing" with a
heartbeat that stops; every worker re-queues such stalled jobs, and the rerun starts from
the published version (the mirror is re-seeded if the dead round had advanced it), so one
version is published.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path
from typing import Any

from cdcca_edge.core.errors import UsageError

QUEUE = "rounds"
HEARTBEAT_SECONDS = 10.0  # procrastinate's defaults: a worker beats every 10 s ...
STALLED_SECONDS = 30.0  # ... and is taken for dead after 30 s without one
MAX_ATTEMPTS = 5  # a round that kills its worker every time is given up after this many
_APPS: dict[str, Any] = {}
_WORKER: dict[str, str] = {}  # this worker process's data directory and AKD launcher (run_worker's)


def queue_app(db_url: str) -> Any:
    """The procrastinate app on ``db_url`` (a PostgreSQL URL), its round task registered."""
    if not db_url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        raise UsageError(f"the task queue needs PostgreSQL (--db postgresql://...), not {db_url.split(':')[0]}")
    if db_url in _APPS:
        return _APPS[db_url]
    import procrastinate

    conninfo = "postgresql://" + db_url.split("://", 1)[1]
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo))

    @app.task(name="cdcca.round", queue=QUEUE, pass_context=True,
              retry=procrastinate.RetryStrategy(max_attempts=MAX_ATTEMPTS, wait=10))
    def round_job(context: Any, data_dir: str, cohort: str, min_new: int = 1) -> dict[str, Any]:
        """Run a due round. A round with nothing new (the job ran twice, or a round by hand
        came first) publishes nothing and succeeds."""
        from cdcca_edge.cloud.service.rounds import NothingNew, run_round

        log = lambda m: print(f"cdcca-edge worker: {cohort}: {m}", file=sys.stderr, flush=True)  # noqa: E731
        try:
            # the worker's own mount of the shared data directory, else the path the API process gave
            doc = run_round(_WORKER.get("data", data_dir), cohort, db_url=db_url, progress=log,
                            launcher=_WORKER.get("launcher"), min_new_uploads=min_new)
        except NothingNew as exc:
            log(f"nothing to do ({exc})")
            return {"cohort": cohort, "published": None}
        log(f"published version {doc['version']} (attempt {context.job.attempts + 1})")
        return doc

    app.round_job = round_job
    _APPS[db_url] = app
    return app


def defer_round(db_url: str, data_dir: str | Path, cohort: str, min_new: int = 1) -> int | None:
    """Queue a round of ``cohort``; returns the job id, None when one is waiting or running
    already (the uploads it would take are that round's). Two API processes may both queue
    one at the same moment: the second runs after the first (same ``lock``) and finds
    nothing new, which publishes nothing."""
    app = queue_app(db_url)
    with app.open():
        lock = f"round-{cohort}"
        if any(app.job_manager.list_jobs(lock=lock, status=st) for st in ("todo", "doing")):
            return None
        return app.round_job.configure(lock=lock).defer(data_dir=str(Path(data_dir).resolve()), cohort=cohort,
                                                        min_new=min_new)


async def _recover_stalled(app: Any, stalled: float, every: float) -> None:
    """Re-queue rounds whose worker stopped beating (killed, lost its machine)."""
    while True:
        for job in await app.job_manager.get_stalled_jobs(queue=QUEUE, seconds_since_heartbeat=stalled):
            if job.attempts + 1 >= MAX_ATTEMPTS:
                print(f"cdcca-edge worker: job {job.id} stalled {job.attempts + 1} times; given up",
                      file=sys.stderr, flush=True)
                from procrastinate.jobs import Status

                await app.job_manager.finish_job(job, status=Status.FAILED, delete_job=False)
                continue
            print(f"cdcca-edge worker: job {job.id} ({job.task_kwargs.get('cohort')}) lost its worker; "
                  "queued again", file=sys.stderr, flush=True)
            await app.job_manager.retry_job(job)
        await asyncio.sleep(every)


def run_worker(db_url: str, data_dir: str | Path | None = None, concurrency: int = 1, name: str | None = None,
               launcher: str | None = None, heartbeat: float = HEARTBEAT_SECONDS,
               stalled: float = STALLED_SECONDS) -> None:
    """Run round jobs until SIGTERM / SIGINT (a running round is finished first).
    ``data_dir``: this machine's mount of the service's data directory. ``launcher``: run
    each round's AKD under it (``accelerate launch --multi_gpu ...``)."""
    from cdcca_edge.cloud.service.store import database_url, open_db

    if data_dir is not None:
        _WORKER["data"] = str(Path(data_dir).resolve())
    if launcher:
        _WORKER["launcher"] = launcher

    open_db(database_url(Path("."), db_url))  # migrations, the queue's schema included
    app = queue_app(db_url)

    async def main() -> None:
        async with app.open_async():
            recover = asyncio.create_task(_recover_stalled(app, stalled, max(1.0, heartbeat)))
            try:
                await app.run_worker_async(queues=[QUEUE], name=name, concurrency=concurrency,
                                           update_heartbeat_interval=heartbeat, stalled_worker_timeout=stalled,
                                           fetch_job_polling_interval=1.0)
            finally:
                recover.cancel()

    asyncio.run(main())


def launch_command(launcher: str, teacher: str, student: str, bundles: list[Path], out: Path) -> list[str]:
    """The AKD stage as a separate launch (``accelerate launch --multi_gpu ...``): the
    `cdcca-edge distill` command under ``launcher``. A launcher not on PATH is looked for
    beside this Python (a virtual environment's bin/)."""
    import shutil

    argv = shlex.split(launcher)
    if not argv:
        raise UsageError("--launcher is empty; give a command such as 'accelerate launch'")
    if shutil.which(argv[0]) is None and (Path(sys.executable).parent / argv[0]).is_file():
        argv[0] = str(Path(sys.executable).parent / argv[0])
    cmd = [*argv, "-m", "cdcca_edge.cli", "distill", "--teacher", teacher, "--student", student]
    for b in bundles:
        cmd += ["--bundle", str(b)]
    return [*cmd, "-o", str(out), "--json"]
