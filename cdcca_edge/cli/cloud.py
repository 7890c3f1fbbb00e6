"""`cdcca-edge cloud`: the cloud service (serve) and its operator actions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cdcca_edge.cli._output import err, out, print_json
from cdcca_edge.cli.options import JsonOpt

app = typer.Typer(help="The cloud service: serve devices, create cohorts, enroll devices.", no_args_is_help=True)

DataOpt = Annotated[Path, typer.Option("--data", help="The service's data directory (blobs, mirrors, TUF "
                                        "metadata; shared by every process of one service).")]
DbOpt = Annotated[Optional[str], typer.Option(
    "--db", envvar="CDCCA_DB", help="Database URL (postgresql://USER@HOST:PORT/DB for scale-out); default: "
    "SQLite in --data.")]


@app.command("serve")
def serve(
    data: DataOpt,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8600,
    max_upload_mb: Annotated[int, typer.Option(help="Largest uplink bundle accepted, MiB.")] = 64,
    min_uploads: Annotated[Optional[int], typer.Option(
        help="Run a cohort's round in this process once this many new uploads arrived.")] = None,
    every: Annotated[Optional[float], typer.Option(
        help="Also run a cohort's round when any upload is new and this many seconds passed since its "
             "latest version.")] = None,
    round_poll: Annotated[float, typer.Option(help="Seconds between checks for due rounds.")] = 5.0,
    uploads_per_hour: Annotated[Optional[int], typer.Option(
        help="A device's quota of stored uploads per hour (429 beyond it).")] = None,
    db: DbOpt = None,
    queue: Annotated[bool, typer.Option(
        help="Hand due rounds to `cdcca-edge cloud worker` processes through the task queue (needs "
             "PostgreSQL --db) instead of running them in this process.")] = False,
    workers: Annotated[int, typer.Option(
        help="API processes sharing the port (uvicorn workers); each is stateless.")] = 1,
) -> None:
    """Run the service (embedded default: SQLite in DATA, blobs in DATA/blobs, rounds in a
    thread of this process)."""
    if queue and not (db or "").startswith(("postgresql", "postgres:")):
        raise typer.BadParameter("--queue needs --db postgresql://... (the queue lives in PostgreSQL)")
    import uvicorn

    from cdcca_edge.cloud.service.app import create_app

    data.mkdir(parents=True, exist_ok=True)
    err.print(f"cdcca-edge cloud: serving {data} on http://{host}:{port} (API under /v1)", highlight=False)
    config = {"data_dir": str(data.resolve()), "db_url": db, "max_upload": max_upload_mb << 20,
              "min_uploads": min_uploads, "poll_seconds": round_poll, "uploads_per_hour": uploads_per_hour,
              "every": every, "queue": queue}
    if workers > 1:  # uvicorn starts each process from an import string, so the config goes by env
        import json
        import os

        from cdcca_edge.cloud.service.app import CONFIG_ENV, NoDelayH11Protocol
        from cdcca_edge.cloud.service.store import database_url, open_db

        open_db(database_url(data, db))  # migrate once here, not in N processes at once
        os.environ[CONFIG_ENV] = json.dumps(config)
        uvicorn.run("cdcca_edge.cloud.service.app:app_from_env", factory=True, workers=workers, host=host,
                    port=port, log_level="warning", http=NoDelayH11Protocol)
    else:
        uvicorn.run(create_app(**config), host=host, port=port, log_level="warning")


@app.command("create-cohort")
def create_cohort(
    name: Annotated[str, typer.Argument(help="Cohort name (letters, digits, '-', '_').")],
    artifact: Annotated[Path, typer.Option(help="The device artefact of version 0 (from export: a GGUF file, ONNX directory or bundle).")],
    data: DataOpt,
    sign_key: Annotated[Path, typer.Option(
        help="Online Ed25519 private key (PEM, `cdcca-edge delta keygen`): signs deltas and the TUF "
             "targets, snapshot and timestamp metadata. Kept by path.")],
    root_key: Annotated[Path, typer.Option(
        help="TUF root Ed25519 private key (PEM): signs root metadata only; needed again only to rotate "
             "keys, so keep it offline.")],
    teacher: Annotated[Optional[Path], typer.Option(help="Teacher HF directory (rounds need it).")] = None,
    student: Annotated[Optional[Path], typer.Option(help="Student HF directory the artefact was exported from.")] = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a cohort whose version 0 is the given device artefact."""
    from cdcca_edge.cloud.service.ops import create_cohort as do_create

    doc = do_create(data, name, artifact, sign_key=sign_key, root_key=root_key, db_url=db, teacher=teacher,
                    student=student)
    if json_out:
        print_json(doc)
    else:
        out.print(f"cohort {doc['cohort']}: version 0 = {doc['identity'][:16]} ({doc['bytes']:,} bytes)",
                  highlight=False)


@app.command("enroll-token")
def enroll_token(
    cohort: Annotated[str, typer.Option(help="The cohort the device joins.")],
    data: DataOpt,
    uses: Annotated[int, typer.Option(help="How many devices may enroll with it.")] = 1,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Make an enrollment token (shown once; stored hashed)."""
    from cdcca_edge.cloud.service.ops import enroll_token as do_token

    token = do_token(data, cohort, uses, db_url=db)
    if json_out:
        print_json({"cohort": cohort, "token": token, "uses": uses})
    else:
        out.print(token, highlight=False)


@app.command("round")
def round_(
    cohort: Annotated[str, typer.Argument(help="The cohort.")],
    data: DataOpt,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run a round now: AKD from the cohort's uploads, DWC against its mirror, publish
    version n+1 (signed with the cohort's key)."""
    from cdcca_edge.cli._output import stage_status
    from cdcca_edge.cloud.service.rounds import run_round

    with stage_status(not json_out) as on_stage:
        doc = run_round(data, cohort, db_url=db, progress=on_stage)
    if json_out:
        print_json(doc)
    else:
        out.print(f"cohort {cohort}: version {doc['version']} = {doc['identity'][:16]}, delta "
                  f"{doc['delta_bytes']:,} bytes from {doc['uploads']} uploads ({doc['new_uploads']} new)",
                  highlight=False)


@app.command("revoke")
def revoke(
    device_id: Annotated[str, typer.Argument(help="The device id its enrollment returned.")],
    data: DataOpt,
    db: DbOpt = None,
) -> None:
    """Revoke a device: its token is refused from now on (it must enroll again)."""
    from cdcca_edge.cloud.service.ops import revoke_device

    revoke_device(data, device_id, db_url=db)
    out.print(f"device {device_id} revoked", highlight=False)


@app.command("publish")
def publish(
    cohort: Annotated[str, typer.Argument(help="The cohort.")],
    artifact: Annotated[Path, typer.Option(help="The new device artefact (same tensor layout), built elsewhere.")],
    data: DataOpt,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Publish an artefact built elsewhere as the cohort's next version, with an exact
    signed delta from the latest."""
    from cdcca_edge.cloud.service.ops import publish as do_publish

    doc = do_publish(data, cohort, artifact, db_url=db)
    if json_out:
        print_json(doc)
    else:
        out.print(f"cohort {cohort}: version {doc['version']} = {doc['identity'][:16]}, delta "
                  f"{doc['delta_bytes']:,} bytes", highlight=False)


@app.command("rotate-key")
def rotate_key(
    cohort: Annotated[str, typer.Argument(help="The cohort.")],
    data: DataOpt,
    root_key: Annotated[Path, typer.Option(help="The cohort's current TUF root key (PEM).")],
    new_sign_key: Annotated[Optional[Path], typer.Option(help="The new online key (PEM).")] = None,
    new_root_key: Annotated[Optional[Path], typer.Option(help="The new root key (PEM).")] = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Rotate a cohort's keys: new root metadata signed by the current root key (and the
    new one); devices follow it at their next update check."""
    from cdcca_edge.cloud.service.ops import rotate_keys

    doc = rotate_keys(data, cohort, root_key, new_sign_key=new_sign_key, new_root_key=new_root_key, db_url=db)
    if json_out:
        print_json(doc)
    else:
        out.print(f"cohort {cohort}: root metadata version {doc['root_version']}", highlight=False)


@app.command("migrate")
def migrate(data: DataOpt, db: DbOpt = None, json_out: JsonOpt = False) -> None:
    """Bring the database schema to this version's (Alembic; on PostgreSQL the task queue's
    schema too). Every command does it at start; run it alone before a rolling upgrade."""
    from cdcca_edge.cloud.service.store import database_url, open_db, schema_revision

    data.mkdir(parents=True, exist_ok=True)
    sessions = open_db(database_url(data, db))
    doc = {"revision": schema_revision(sessions)}
    if json_out:
        print_json(doc)
    else:
        out.print(f"schema at revision {doc['revision']}", highlight=False)


@app.command("worker")
def worker(
    data: DataOpt,
    db: Annotated[str, typer.Option("--db", envvar="CDCCA_DB", help="PostgreSQL URL of the service's state "
                                    "and task queue.")],
    concurrency: Annotated[int, typer.Option(help="Rounds run at once by this process (of different "
                                             "cohorts).")] = 1,
    name: Annotated[Optional[str], typer.Option(help="Worker name (shown in the queue's tables).")] = None,
    launcher: Annotated[Optional[str], typer.Option(
        help="Run each round's AKD under this launcher, e.g. 'accelerate launch --multi_gpu --num_processes 4'.")
    ] = None,
    heartbeat: Annotated[float, typer.Option(help="Seconds between this worker's heartbeats.")] = 10.0,
    stalled: Annotated[float, typer.Option(
        help="A job whose worker sent no heartbeat for this long is queued again.")] = 30.0,
) -> None:
    """Run round jobs from the task queue (scale-out: `serve --db postgresql://... --queue`
    defers them). SIGTERM lets the running round finish."""
    from cdcca_edge.cloud.service.jobs import run_worker

    if stalled <= 2 * heartbeat:
        raise typer.BadParameter("--stalled must be more than twice --heartbeat, or live rounds would run twice")
    err.print(f"cdcca-edge cloud worker: rounds of {data} from the queue in {db.split('@')[-1]}", highlight=False)
    run_worker(db, data, concurrency=concurrency, name=name, launcher=launcher, heartbeat=heartbeat, stalled=stalled)
