"""`engine run / check / send / map / messages` — what an interface analyst types."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from engine.configfile import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Imaging integration engine (HL7, FHIR, DICOM).")
messages_app = typer.Typer(help="Stored messages: list, show, replay.")
app.add_typer(messages_app, name="messages")
# piped output (scripts, `| less`) gets wide tables instead of rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="engine.yaml to use", envvar="ENGINE_CONFIG")]
DEFAULT_CONFIG = Path("engine.yaml")


def _load(config: Path, *, load_mappings: bool = True) -> Any:
    from engine.runtime.app import default_registry
    from engine.runtime.config import load_config

    try:
        return load_config(config, default_registry(), load_mappings=load_mappings)
    except ConfigError as exc:
        for problem in exc.problems:
            err.print(f"[red]error[/red] {problem}", highlight=False, soft_wrap=True)
        err.print(f"{len(exc.problems)} problem(s) found; nothing was started.")
        raise typer.Exit(1) from None


def _db(config: Path) -> Any:
    from engine.store.db import init_db, make_engine

    loaded = _load(config, load_mappings=False)
    db = make_engine(loaded.storage_url)
    init_db(db)
    return db


@app.command()
def check(config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Validate engine.yaml, every channel and every mapping; report every problem."""
    loaded = _load(config)
    from engine.mapping import check_examples

    failures = 0
    checked: set[int] = set()
    for spec in loaded.channels:
        for mapping in spec.mappings.values():
            if id(mapping) in checked:
                continue
            checked.add(id(mapping))
            for failure in check_examples(mapping):
                err.print(f"[red]example failed[/red] {failure}", highlight=False)
                failures += 1
    if failures:
        raise typer.Exit(1)
    console.print(f"OK: {len(loaded.channels)} channel(s), storage {loaded.storage_url.split('://')[0]}")


@app.command()
def run(config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Start every enabled channel, the DICOM worklist SCP and the scheduled jobs."""
    loaded = _load(config)
    logging.basicConfig(level=loaded.engine.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pynetdicom", "apscheduler"):  # pynetdicom logs identifiers (PHI) at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from engine.runtime.app import EngineApp, default_registry

    async def main() -> None:
        engine_app = EngineApp(loaded, default_registry())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await engine_app.start()
        for what, ep in engine_app.endpoints():
            console.print(f"  {what:<16} {ep}", highlight=False)
        console.print("engine running; Ctrl-C stops it", highlight=False)
        await stop.wait()
        await engine_app.stop()

    asyncio.run(main())


def _parse_target(to: str) -> tuple[str, int]:
    host, _, port = to.rpartition(":")
    if not port.isdigit():
        raise typer.BadParameter("use HOST:PORT, e.g. localhost:2575", param_hint="--to")
    return host or "127.0.0.1", int(port)


@app.command()
def send(
    files: Annotated[list[Path], typer.Argument(help="HL7 files (a file may hold a batch)", exists=True)],
    to: Annotated[str, typer.Option("--to", help="HOST:PORT of the MLLP listener")] = "localhost:2575",
    connections: Annotated[int, typer.Option("--connections", "-n", min=1)] = 1,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each ACK")] = 30.0,
) -> None:
    """Send HL7 messages over MLLP and print the ACKs (a summary for many)."""
    from engine.hl7.batch import split_batch_bytes
    from engine.hl7.mllp import MLLPClient, MLLPError

    messages: list[bytes] = []
    for file in files:
        messages += split_batch_bytes(file.read_bytes())
    host, port = _parse_target(to)
    counts = {"sent": 0, "AA": 0, "AE": 0, "AR": 0, "CA": 0, "CE": 0, "CR": 0, "other": 0, "failed": 0}
    single = len(messages) == 1

    async def worker(todo: asyncio.Queue[bytes], progress: Any, task: Any) -> None:
        client = MLLPClient(host, port, read_timeout=timeout)
        try:
            while not todo.empty():
                body = todo.get_nowait()
                try:
                    reply = await client.send(body)
                except (MLLPError, OSError) as exc:
                    counts["failed"] += 1
                    if single:
                        err.print(f"failed: {type(exc).__name__}: {exc}")
                else:
                    counts["sent"] += 1
                    code = _msa1(reply)
                    counts[code if code in counts else "other"] += 1
                    if single:
                        console.print(reply.decode("latin-1").replace("\r", "\n"), highlight=False)
                if progress is not None:
                    progress.advance(task)
        finally:
            await client.close()

    async def main() -> float:
        todo: asyncio.Queue[bytes] = asyncio.Queue()
        for m in messages:
            todo.put_nowait(m)
        start = time.perf_counter()
        if single:
            await worker(todo, None, None)
        else:
            columns = (TextColumn("sending"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            with Progress(*columns, console=err) as progress:
                task = progress.add_task("send", total=len(messages))
                await asyncio.gather(*(worker(todo, progress, task) for _ in range(connections)))
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    if not single:
        rate = len(messages) / elapsed if elapsed > 0 else 0.0
        shown = {k: v for k, v in counts.items() if v or k in ("sent", "AA", "AE", "AR", "failed")}
        console.print("  ".join(f"{k}={v}" for k, v in shown.items()) + f"  rate={rate:.0f} msg/s", highlight=False)
    if counts["failed"] or counts["AE"] or counts["AR"] or counts["CE"] or counts["CR"]:
        raise typer.Exit(1)


def _msa1(reply: bytes) -> str:
    if reply in (b"\x06", b"\x15"):
        return "CA" if reply == b"\x06" else "CR"
    for seg in reply.replace(b"\n", b"\r").split(b"\r"):
        if seg.startswith(b"MSA"):
            parts = seg.split(seg[3:4] or b"|")
            return parts[1].decode("ascii", "replace") if len(parts) > 1 else "other"
    return "other"


@app.command("map")
def map_cmd(
    mapping: Annotated[Path | None, typer.Argument(help="mapping YAML file")] = None,
    sample: Annotated[Path | None, typer.Argument(help="sample HL7 message file")] = None,
    check_: Annotated[bool, typer.Option("--check", help="run the examples of the mapping(s)")] = False,
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Print what a mapping makes of a sample message, or check the mappings' examples."""
    from engine.hl7.er7 import Message
    from engine.mapping import MappingConfigError, check_examples, load_mapping, render

    base = config.resolve().parent if config.exists() else Path.cwd()
    files = [mapping] if mapping else sorted((base / "mappings").glob("*.yaml"))
    failures = 0
    for file in files:
        try:
            m = load_mapping(file, tables_dir=file.parent / "tables")
        except MappingConfigError as exc:
            for p in exc.problems:
                err.print(f"[red]error[/red] {p.file}:{p.line}:{p.column} {p.key}: {p.message}", highlight=False)
            raise typer.Exit(1) from None
        if check_ or sample is None:
            problems = check_examples(m)
            for failure in problems:
                err.print(f"[red]example failed[/red] {failure}", highlight=False)
            failures += len(problems)
            console.print(f"{file}: {'OK' if not problems else f'{len(problems)} failure(s)'}", highlight=False)
            continue
        msg = Message.parse(sample.read_bytes())
        try:
            outputs = m.run(msg)
        except Exception as exc:
            err.print(f"[red]mapping error[/red] {exc}", highlight=False)
            raise typer.Exit(1) from None
        console.print(render(outputs, m.output), highlight=False, markup=False)
    if failures:
        raise typer.Exit(1)


# -- messages -----------------------------------------------------------------------------------
def _when(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a date (use 2026-11-25 or 2026-11-25T10:00)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@messages_app.callback(invoke_without_command=True)
def messages_list(
    ctx: typer.Context,
    channel: Annotated[str | None, typer.Option("--channel")] = None,
    status: Annotated[str | None, typer.Option("--status", help="processed, filtered, error, duplicate")] = None,
    message_type: Annotated[str | None, typer.Option("--type", help="e.g. ORM^O01")] = None,
    control_id: Annotated[str | None, typer.Option("--control-id")] = None,
    patient_id: Annotated[str | None, typer.Option("--patient")] = None,
    since: Annotated[str | None, typer.Option("--since", help="received at or after (ISO date/time, UTC)")] = None,
    until: Annotated[str | None, typer.Option("--until", help="received before (ISO date/time, UTC)")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """List received messages, newest first."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = config
        return
    from engine.store.messages import MessageFilter, list_messages

    rows = list_messages(
        _db(config),
        MessageFilter(channel, status, message_type, control_id, patient_id, _when(since), _when(until), limit),
    )
    if as_json:
        for row in rows:
            row["received_at"] = row["received_at"].isoformat()
            sys.stdout.write(json.dumps(row) + "\n")
        return
    table = Table("id", "received (UTC)", "channel", "type", "control id", "status", "error")
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["received_at"].strftime("%Y-%m-%d %H:%M:%S"),
            r["channel"],
            r["message_type"],
            r["control_id"],
            r["status"],
            (r["error"] or "")[:60],
        )
    console.print(table)


@messages_app.command("show")
def messages_show(ctx: typer.Context, message_id: int) -> None:
    """Print one message: raw text, segments, the ACK sent and each delivery's state."""
    from engine.hl7.er7 import Message
    from engine.store.messages import get_message
    from engine.store.queue import deliveries_for

    db = _db(ctx.obj or DEFAULT_CONFIG)
    row = get_message(db, message_id)
    if row is None:
        err.print(f"no message {message_id}")
        raise typer.Exit(1)
    console.print(
        f"[bold]message {row['id']}[/bold] channel={row['channel']} type={row['message_type']} "
        f"control_id={row['control_id']} status={row['status']} received={row['received_at']}"
    )
    if row["error"]:
        console.print(
            f"[red]error[/red] {row['error']} (code {row['error_code']}, {row['error_location'] or '-'})",
            highlight=False,
        )
    if row["flags"]:
        console.print(f"flags: {row['flags']}")
    raw = row["raw"]
    console.rule("raw")
    console.print(raw.decode("utf-8", errors="replace").replace("\r", "\n"), highlight=False, markup=False)
    try:
        msg = Message.parse(raw)
    except Exception as exc:
        console.print(f"(not parseable: {exc})")
    else:
        console.rule("segments")
        for seg in msg.segments():
            for i, value in enumerate(seg.fields[1:], start=1):
                if value:
                    console.print(f"{seg.name}-{i}: {value}", highlight=False, markup=False)
    console.rule("ACK sent")
    console.print((row["ack"] or "(none)").replace("\r", "\n"), highlight=False, markup=False)
    console.rule("deliveries")
    table = Table("id", "destination", "state", "attempts", "next attempt", "last error", "response")
    for d in deliveries_for(db, message_id):
        table.add_row(
            str(d["id"]),
            d["destination"],
            d["state"],
            str(d["attempts"]),
            str(d["next_attempt_at"]),
            d["last_error"][:60],
            d["response"][:40].replace("\r", " "),
        )
    console.print(table)


@messages_app.command("replay")
def messages_replay(
    ctx: typer.Context,
    message_ids: list[int],
    reprocess: Annotated[bool, typer.Option(help="run the message through its channel again as a new message")] = False,
) -> None:
    """Revive a message's dead deliveries, or send it through its channel again."""
    from engine.runtime.replay import replay

    loaded = _load(ctx.obj or DEFAULT_CONFIG)
    for line in asyncio.run(replay(loaded, message_ids, reprocess=reprocess)):
        console.print(line, highlight=False)


@app.command()
def worklist(
    date: Annotated[str | None, typer.Option("--date", help="SPS start date, YYYYMMDD")] = None,
    modality: Annotated[str | None, typer.Option("--modality")] = None,
    station: Annotated[str | None, typer.Option("--station", help="Scheduled Station AE Title")] = None,
    accession: Annotated[str | None, typer.Option("--accession")] = None,
    status: Annotated[str | None, typer.Option("--status", help="SCHEDULED, IN PROGRESS, CANCELLED, ...")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """List worklist items (what modalities see), soonest first."""
    from sqlalchemy import select

    from engine.store.worklist import WorklistItem

    t = WorklistItem.__table__  # type: ignore[attr-defined]
    cols = [t.c.id, t.c.accession_number, t.c.patient_id, t.c.sps_start_date, t.c.sps_start_time, t.c.modality,
            t.c.station_aet, t.c.status, t.c.filler_order, t.c.placer_order]
    stmt = select(*cols).order_by(t.c.sps_start, t.c.id).limit(limit)
    for column, value in ((t.c.sps_start_date, date), (t.c.modality, modality), (t.c.station_aet, station),
                          (t.c.accession_number, accession), (t.c.status, status)):
        if value:
            stmt = stmt.where(column == value)
    with _db(config).connect() as conn:
        rows = [dict(r) for r in conn.execute(stmt).mappings()]
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return
    table = Table("id", "accession", "patient id", "date", "time", "modality", "station", "status", "order")
    for r in rows:
        table.add_row(str(r["id"]), r["accession_number"], r["patient_id"], r["sps_start_date"], r["sps_start_time"],
                      r["modality"], r["station_aet"], r["status"], r["filler_order"] or r["placer_order"])
    console.print(table)


def main() -> None:  # pragma: no cover
    app()
