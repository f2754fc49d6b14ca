"""`engine run / check / send / map / messages / status` — what an interface analyst types."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from engine.configfile import ConfigError
from engine.terminal import terminal_text

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Imaging integration engine (HL7, FHIR, DICOM).")
messages_app = typer.Typer(help="Stored messages: list, show, replay.")
app.add_typer(messages_app, name="messages")
keys_app = typer.Typer(help="Encryption at rest (ENGINE_KEY): new key, status, rotate.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
# piped output (scripts, `| less`) gets wide tables instead of rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

# -c may come before the subcommand (`engine -c x.yaml check`) or after it (`engine check -c x.yaml`);
# the one nearest the command wins, then $ENGINE_CONFIG, then ./engine.yaml
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="engine.yaml to use (default: $ENGINE_CONFIG, else ./engine.yaml)",
                 show_default=False),
]
DEFAULT_CONFIG = Path("engine.yaml")


def _config_path(ctx: typer.Context, config: Path | None) -> Path:
    """The config this command reads: its own -c, else the nearest one given before it."""
    if config is not None:
        return config
    obj = ctx.find_object(dict)
    if obj and obj.get("config") is not None:
        return Path(obj["config"])
    env = os.environ.get("ENGINE_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def _remember_config(ctx: typer.Context, config: Path | None) -> None:
    obj = ctx.ensure_object(dict)
    if config is not None:
        obj["config"] = config


def _version(value: bool) -> None:
    if value:
        from engine import __version__

        console.print(f"engine {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def engine_main(
    ctx: typer.Context,
    config: ConfigOpt = None,
    version: Annotated[
        bool, typer.Option("--version", help="print the engine version and exit", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Imaging integration engine (HL7, FHIR, DICOM)."""
    _remember_config(ctx, config)


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


def _db(config: Path) -> tuple[Any, Any]:
    """(database engine, loaded configuration) for the read-only commands."""
    from engine.store import crypto
    from engine.store.db import init_db, make_engine

    loaded = _load(config, load_mappings=False)
    # the folder-mode and no-key warnings are said by `engine run` at start, not by every listing
    logging.getLogger("engine.store.files").setLevel(logging.ERROR)
    logging.getLogger("engine.store.crypto").setLevel(logging.ERROR)
    try:
        crypto.configure(crypto.key_from_env())  # each command reads ENGINE_KEY as it is now
        db = make_engine(loaded.storage_url)
        init_db(db)
    except crypto.KeyConfigError as exc:
        _fail(str(exc))
    return db, loaded


def _cell(value: Any) -> Text:
    """A table cell from stored content: no markup, no control characters."""
    return Text(terminal_text("" if value is None else str(value)))


def _content(text: str | bytes | None) -> None:
    """Print message content (a stored body, an ACK): segment breaks as lines, controls tagged."""
    console.print(terminal_text(text, lines=True), highlight=False, markup=False, emoji=False)


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _fail(text: str) -> NoReturn:
    """One line on stderr and exit 1: what a new user reads instead of a traceback."""
    err.print(f"[red]error[/red] {escape(terminal_text(text))}", highlight=False, soft_wrap=True, emoji=False)
    raise typer.Exit(1)


def _one_of(option: str, value: str | None, known: list[str]) -> str | None:
    if value is None or value in known:
        return value
    raise typer.BadParameter(f"{value!r} is not one of: {', '.join(known)}", param_hint=option)


@app.command()
def check(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Validate engine.yaml, every channel and every mapping (with its examples); report every
    problem of every stage in one run, sorted by file and line."""
    from engine.configfile import Problem
    from engine.mapping import check_examples
    from engine.runtime.app import default_registry
    from engine.runtime.config import load_config

    problems: list[Problem] = []
    loaded = load_config(_config_path(ctx, config), default_registry(), problems_out=problems)
    lines = [(p.file, p.line, p.column, str(p)) for p in problems]
    checked: set[int] = set()
    for spec in loaded.channels:
        for mapping in spec.mappings.values():
            if id(mapping) in checked:
                continue
            checked.add(id(mapping))
            for failure in check_examples(mapping):
                lines.append((*_place(failure), failure))
    for *_, text in sorted(lines):
        err.print(f"[red]error[/red] {text}", highlight=False, soft_wrap=True)
    if lines:
        err.print(f"{len(lines)} problem(s) found.")
        raise typer.Exit(1)
    console.print(f"OK: {len(loaded.channels)} channel(s), storage {loaded.storage_url.split('://')[0]}")


def _place(text: str) -> tuple[str, int, int]:
    """(file, line, column) at the start of a `file:line[:col] ...` problem, for sorting."""
    parts = text.split(":", 3)
    nums = [int(p) if p.isdigit() else 0 for p in parts[1:3]] + [0, 0]
    return parts[0], nums[0], nums[1]


@app.command()
def run(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Start every enabled channel, the DICOM worklist SCP and the scheduled jobs."""
    loaded = _load(_config_path(ctx, config))
    logging.basicConfig(level=loaded.engine.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.store import crypto

    try:
        crypto.configure(crypto.key_from_env())  # a bad ENGINE_KEY stops here, named, before anything listens
    except crypto.KeyConfigError as exc:
        _fail(str(exc))
    for noisy in ("pynetdicom", "apscheduler"):  # pynetdicom logs identifiers (PHI) at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from engine.runtime.app import EngineApp, default_registry
    from engine.runtime.cluster import ClusterError

    async def main() -> None:
        engine_app = EngineApp(loaded, default_registry())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await engine_app.start()
        except ClusterError as exc:  # another process owns the store: say so, start nothing
            await engine_app.stop()
            _fail(str(exc))
        except OSError as exc:  # a port in use, an address not on this host: one line, not a traceback
            await engine_app.stop()
            _fail(f"cannot start: {exc.strerror or exc}")
        from engine.runtime import heap

        heap.settle()  # what start-up loaded stays out of the collector's way (engine.runtime.heap)
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
    connections: Annotated[
        int, typer.Option("--connections", "-n", min=1, help="MLLP connections sending in parallel")
    ] = 1,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each ACK")] = 30.0,
    today: Annotated[
        bool,
        typer.Option(
            "--today",
            help="move each order's scheduled start (ORC-7.4, TQ1-7, OBR-27.4, OBR-36) to today, keeping the "
            "time of day; for test messages with fixed dates. The files are not changed.",
        ),
    ] = False,
) -> None:
    """Send HL7 messages over MLLP and print the ACKs (a summary for many)."""
    from engine.hl7.batch import split_batch_bytes
    from engine.hl7.mllp import MLLPClient, MLLPError
    from engine.hl7.reschedule import move_scheduled_dates

    messages: list[bytes] = []
    for file in files:
        found = split_batch_bytes(file.read_bytes())
        if not found:
            _fail(f"no HL7 message found in {file} (a message starts with an MSH segment); nothing was sent")
        messages += found
    if today:
        moved = [move_scheduled_dates(m, date.today()) for m in messages]
        messages = [body for body, _ in moved]
        err.print(f"scheduled start moved to today in {sum(1 for _, n in moved if n)} of {len(moved)} message(s)",
                  highlight=False)
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
                        err.print(f"failed: {type(exc).__name__}: {terminal_text(str(exc))}", highlight=False,
                                  markup=False, emoji=False)
                else:
                    counts["sent"] += 1
                    code = _msa1(reply)
                    counts[code if code in counts else "other"] += 1
                    if single:
                        _content(reply.decode("latin-1"))
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


def _channel_types(config: Path, mapping_file: Path) -> tuple[list[str], list[str]]:
    """(message types, channel names) the configured channels hand to this mapping file; empty if unknown."""
    if not config.exists():
        return [], []
    from engine.runtime.app import default_registry
    from engine.runtime.config import load_config

    try:
        loaded = load_config(config, default_registry(), load_mappings=False)
    except Exception:  # `engine check` reports a broken config; map still maps
        return [], []
    mappings_dir = loaded.base_dir / loaded.engine.mappings_dir
    target = mapping_file.resolve()
    types: list[str] = []
    channels: list[str] = []
    for spec in loaded.channels:
        for message_type, file in spec.config.mappings.items():
            if (mappings_dir / file).resolve() == target:
                types.append(message_type)
                if spec.config.name not in channels:
                    channels.append(spec.config.name)
    return types, channels


def _message_type(msg: Any) -> str:
    return "^".join(p for p in (msg.get("MSH-9.1"), msg.get("MSH-9.2")) if p)


@app.command("map")
def map_cmd(
    ctx: typer.Context,
    mapping: Annotated[
        Path | None, typer.Argument(help="mapping YAML file (default: every mapping in mappings/)", show_default=False)
    ] = None,
    sample: Annotated[
        Path | None, typer.Argument(help="sample HL7 message file; without it the examples are run")
    ] = None,
    check_: Annotated[bool, typer.Option("--check", help="run the examples of the mapping(s)")] = False,
    charset: Annotated[
        str | None,
        typer.Option("--charset", help="decode the sample with this charset (e.g. latin-1) instead of its MSH-18"),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Print what a mapping makes of a sample message, or check the mappings' examples."""
    from engine.mapping import MappingConfigError, check_examples, load_mapping

    config = _config_path(ctx, config)
    base = config.resolve().parent if config.exists() else Path.cwd()
    files = [mapping] if mapping else sorted((base / "mappings").glob("*.yaml"))
    if mapping is not None and not mapping.is_file():
        _fail(f"mapping file {mapping} does not exist")
    if sample is not None and not sample.is_file():
        _fail(f"sample file {sample} does not exist")
    failures = 0
    for file in files:
        try:
            m = load_mapping(file, tables_dir=file.parent / "tables", inputs=_input_kinds())
        except MappingConfigError as exc:
            for p in exc.problems:
                err.print(f"[red]error[/red] {p.file}:{p.line}:{p.column} {p.key}: {p.message}", highlight=False)
            raise typer.Exit(1) from None
        except Exception as exc:
            _fail(f"{file}: cannot load the mapping: {exc}")
        if check_ or sample is None:
            problems = check_examples(m)
            for failure in problems:
                err.print(f"[red]example failed[/red] {failure}", highlight=False)
            failures += len(problems)
            console.print(f"{file}: {'OK' if not problems else f'{len(problems)} failure(s)'}", highlight=False)
            continue
        _map_sample(m, file, sample, charset, config)
    if failures:
        raise typer.Exit(1)


def _input_kinds() -> list[str]:
    from engine.runtime.app import default_registry

    return default_registry().known("input")


def _map_sample(m: Any, file: Path, sample: Path, charset: str | None, config: Path) -> None:
    """Map every message of the sample file; any failure is one line on stderr and exit 1."""
    from engine.hl7.batch import split_batch_bytes
    from engine.hl7.er7 import Message
    from engine.mapping import map_message, render, render_warnings

    try:
        bodies = split_batch_bytes(sample.read_bytes())
    except OSError as exc:
        _fail(f"cannot read {sample}: {exc.strerror}")
    if not bodies:
        _fail(f"no HL7 message found in {sample} (a message starts with an MSH segment)")
    types, channels = _channel_types(config, file)
    for n, body in enumerate(bodies, start=1):
        where = f"{sample}" + (f" message {n}" if len(bodies) > 1 else "")
        try:
            msg = Message.parse(body, charset=charset)
            message_type = _message_type(msg)
            if types and "*" not in types and message_type not in types:
                err.print(
                    f"[yellow]warning[/yellow] {where} is {message_type or 'of no type (MSH-9 empty)'}; "
                    f"{file.name} takes {', '.join(types)} (channel {', '.join(channels)})",
                    highlight=False, soft_wrap=True,
                )
            outputs, warnings = map_message(m, msg)
            warnings = [*msg.warnings, *warnings]  # what reading had to guess, then the mapping's
            text = render(outputs, m.output)
        except Exception as exc:
            hint = ""
            if "not valid" in str(exc) and charset is None:
                hint = "; if the sender uses another charset without MSH-18, try --charset latin-1"
            _fail(f"{where}: {exc}{hint}")
        console.print(terminal_text(text, lines=True), highlight=False, markup=False, emoji=False)
        if warnings:
            err.print(terminal_text(render_warnings(warnings), lines=True), highlight=False, markup=False,
                      soft_wrap=True)


# -- messages -----------------------------------------------------------------------------------
_HL7_TIME = re.compile(r"^(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})?(\d{2})?)?$")


def _when(text: str | None, option: str) -> datetime | None:
    """An ISO (2026-11-25, 2026-11-25T10:00) or HL7 (20261125, 202611251000) date/time, UTC if no zone."""
    if not text:
        return None
    m = _HL7_TIME.match(text)
    try:
        if m:
            y, mo, d, hh, mi, ss = (int(g) if g else 0 for g in m.groups())
            when = datetime(y, mo, d, hh, mi, ss)
        else:
            when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a date (use 2026-11-25, 2026-11-25T10:00, 20261125 or 202611251000)",
            param_hint=option,
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _day(text: str | None, option: str) -> str | None:
    """A day as DICOM/HL7 store it (YYYYMMDD), from 2026-11-25 or 20261125."""
    if not text:
        return None
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return datetime.strptime(text, fmt).strftime("%Y%m%d")
        except ValueError:
            continue
    raise typer.BadParameter(f"{text!r} is not a date (use 2026-11-25 or 20261125)", param_hint=option)


def _warnings(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The stored ProcessingWarning dicts of a message ([] when none or unreadable)."""
    raw = row.get("warnings") or ""
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        return [{"text": "(warnings column is not JSON)", "code": None, "location": "", "source": "", "target": ""}]
    return value if isinstance(value, list) else [value]


def _warning_line(w: dict[str, Any]) -> str:
    where = f" at {w['location']}" if w.get("location") else ""
    target = f" -> {w['target']}" if w.get("target") else ""
    src = f" ({w['source']})" if w.get("source") else ""
    code = f" [code {w['code']}]" if w.get("code") is not None else ""
    return f"{w.get('text', '')}{where}{target}{src}{code}"


def _check_channel(db: Any, loaded: Any, channel: str | None) -> None:
    """A channel filter must name a configured channel (or one that still has stored messages)."""
    if channel is None:
        return
    known = [spec.config.name for spec in loaded.channels]
    if channel in known:
        return
    from sqlalchemy import select

    from engine.store.messages import MESSAGES

    with db.connect() as conn:
        stored = conn.execute(select(MESSAGES.c.id).where(MESSAGES.c.channel == channel).limit(1)).first()
    if stored is None:
        raise typer.BadParameter(f"no channel {channel!r}; configured: {', '.join(known) or '(none)'}",
                                 param_hint="--channel")


@messages_app.callback(invoke_without_command=True)
def messages_list(
    ctx: typer.Context,
    channel: Annotated[str | None, typer.Option("--channel", help="channel name, e.g. ris-orders")] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="processed, filtered, error or duplicate")
    ] = None,
    message_type: Annotated[str | None, typer.Option("--type", help="MSH-9 message type, e.g. ORM^O01")] = None,
    control_id: Annotated[str | None, typer.Option("--control-id", help="MSH-10 message control id")] = None,
    patient_id: Annotated[str | None, typer.Option("--patient", help="patient id (PID-3.1)")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="received at or after (2026-11-25[T10:00] or 20261125[1000]; UTC)")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="received before (2026-11-25[T10:00] or 20261125[1000]; UTC)")
    ] = None,
    with_warnings: Annotated[
        bool, typer.Option("--warnings", help="only messages that kept warnings (optional values dropped or cut)")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many messages")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    config: ConfigOpt = None,
) -> None:
    """List received messages, newest first."""
    _remember_config(ctx, config)
    if ctx.invoked_subcommand is not None:
        return
    from engine.store.messages import MessageFilter, list_messages
    from engine.store.models import MessageStatus

    status = _one_of("--status", status, [s.value for s in MessageStatus])
    window = (_when(since, "--since"), _when(until, "--until"))
    db, loaded = _db(_config_path(ctx, None))
    _check_channel(db, loaded, channel)
    rows = list_messages(
        db,
        MessageFilter(channel=channel, status=status, message_type=message_type, control_id=control_id,
                      patient_id=patient_id, since=window[0], until=window[1], limit=limit,
                      with_warnings=with_warnings),
    )
    if as_json:
        for row in rows:
            row["received_at"] = row["received_at"].isoformat()
            row["warnings"] = _warnings(row)
            sys.stdout.write(json.dumps(row) + "\n")
        return
    table = Table("id", "received (UTC)", "channel", "type", "control id", "status", "warnings", "error")
    for r in rows:
        count = len(_warnings(r))
        table.add_row(
            str(r["id"]),
            r["received_at"].strftime("%Y-%m-%d %H:%M:%S"),
            _cell(r["channel"]),
            _cell(r["message_type"]),
            _cell(r["control_id"]),
            _cell(r["status"]),
            str(count) if count else "",
            _cell((r["error"] or "")[:60]),
        )
    console.print(table)


MessageIdArg = Annotated[int, typer.Argument(help="message id (the first column of `engine messages`)")]


@messages_app.command("show")
def messages_show(
    ctx: typer.Context,
    message_id: MessageIdArg,
    raw_bytes: Annotated[
        bool, typer.Option("--raw", help="write only the stored bytes, exactly as received (to a file or a pipe, "
                                         "never to a terminal)")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Print one message: raw text, segments, the ACK sent, its warnings and each delivery's state.

    Control characters and bytes that are not text are shown as tags (<ESC>, <0xFF>): a sender's
    message never reaches the terminal as escape sequences."""
    from engine.hl7.er7 import Message
    from engine.store.crypto import UnreadableValue
    from engine.store.messages import get_message
    from engine.store.queue import deliveries_for

    if raw_bytes and _stdout_is_terminal():
        _fail("--raw writes the message's bytes as received and stdout is a terminal: redirect it "
              f"(engine messages show {message_id} --raw > message.hl7) or pipe it (| xxd)")
    db, _ = _db(_config_path(ctx, config))
    try:
        row = get_message(db, message_id)
    except UnreadableValue as exc:
        _fail(f"message {message_id}: {exc}")
    if row is None:
        _fail(f"no message {message_id}")
    raw = row["raw"]
    if raw_bytes:
        sys.stdout.flush()
        sys.stdout.buffer.write(raw)
        sys.stdout.buffer.flush()
        return
    head = Text.assemble(
        (f"message {row['id']}", "bold"),
        f" channel={terminal_text(row['channel'])} type={terminal_text(row['message_type'])} "
        f"control_id={terminal_text(row['control_id'])} status={terminal_text(row['status'])} "
        f"received={row['received_at']}",
    )
    console.print(head, highlight=False)
    if row["error"]:
        console.print(Text.assemble(
            ("error", "red"),
            f" {terminal_text(row['error'])} (code {row['error_code']}, {terminal_text(row['error_location']) or '-'})",
        ), highlight=False)
    if row["flags"]:
        console.print(Text(f"flags: {terminal_text(row['flags'])}"), highlight=False)
    warnings = _warnings(row)
    if warnings:
        console.print(f"warnings: {len(warnings)}", highlight=False)
        for w in warnings:
            console.print(Text.assemble("  ", ("warning", "yellow"), f" {terminal_text(_warning_line(w))}"),
                          highlight=False)
    is_json = raw.lstrip()[:1] == b"{"  # a FHIR resource (or another JSON input): shown as it is
    problem = ""
    try:
        msg = None if is_json else Message.parse(raw)
    except Exception as exc:
        msg = None
        problem = str(exc)
    console.rule("raw")
    _content(raw.decode(msg.codec if msg is not None else "utf-8", "surrogateescape"))
    if msg is None and not is_json:
        console.print(Text(f"(not parseable: {terminal_text(problem)})"), highlight=False)
    elif msg is not None:
        console.rule("segments")
        for seg in msg.segments():
            for i, value in enumerate(seg.fields[1:], start=1):
                if value:
                    console.print(Text(f"{terminal_text(seg.name)}-{i}: {terminal_text(value)}"), highlight=False)
    console.rule("ACK sent")
    _content(row["ack"] or "(none)")
    console.rule("deliveries")
    table = Table("id", "destination", "state", "attempts", "next attempt", "node", "last error", "response")
    resent = []
    for d in deliveries_for(db, message_id, payloads=False):
        table.add_row(
            str(d["id"]),
            _cell(d["destination"]),
            _cell(d["state"]),
            str(d["attempts"]),
            str(d["next_attempt_at"]),
            _cell(d["claimed_by"]),
            _cell(d["last_error"][:60]),
            _cell(d["response"][:40].replace("\r", " ")),
        )
        if d["resent"]:
            resent.append(f"delivery {d['id']} ({d['destination']}): {d['resent']}")
    console.print(table)
    for line in resent:  # went out again after a crash: the receiver may have it twice
        console.print(Text(terminal_text(line)), highlight=False)


@messages_app.command("polls")
def messages_polls(
    ctx: typer.Context,
    channel: Annotated[str | None, typer.Option("--channel", help="a polling channel, e.g. emr-medications-poll")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    config: ConfigOpt = None,
) -> None:
    """Where each polling source stands: last run, last success, what it fetched, its watermark."""
    from engine.store.poll_state import load_states

    db, loaded = _db(_config_path(ctx, config))
    _check_channel(db, loaded, channel)
    rows = load_states(db, channel)
    if as_json:
        for row in rows:
            for key in ("last_run_at", "last_ok_at"):
                row[key] = row[key].isoformat() if row[key] is not None else None
            sys.stdout.write(json.dumps(row) + "\n")
        return
    table = Table("channel", "resource", "last run (UTC)", "last success (UTC)", "runs", "fetched", "new", "pages",
                  "since", "error")

    def when(value: datetime | None) -> str:
        return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else ""

    for r in rows:
        table.add_row(_cell(r["channel"]), _cell(r["resource_type"]), when(r["last_run_at"]), when(r["last_ok_at"]),
                      str(r["runs"]), str(r["fetched"]), str(r["stored"]), str(r["pages"]), _cell(r["since"]),
                      _cell(r["last_error"][:60]))
    console.print(table)
    if not rows:
        console.print("no poll has run yet", highlight=False)


@messages_app.command("replay")
def messages_replay(
    ctx: typer.Context,
    message_ids: Annotated[list[int], typer.Argument(help="message ids (the first column of `engine messages`)")],
    reprocess: Annotated[
        bool,
        typer.Option(help="run the message through its channel again, stored as a new message "
                          "(default: only queue its dead deliveries again)"),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Queue a message's dead deliveries again (the running engine sends them), or --reprocess it."""
    from engine.store.crypto import UnreadableValue
    from engine.store.messages import get_message
    from engine.store.queue import revive

    path = _config_path(ctx, config)
    db, _ = _db(path)
    try:
        missing = [mid for mid in message_ids if get_message(db, mid) is None]
    except UnreadableValue as exc:
        _fail(str(exc))
    for mid in missing:
        err.print(f"[red]error[/red] no message {mid}", highlight=False)
    present = [mid for mid in message_ids if mid not in missing]
    if reprocess and present:
        from engine.runtime.replay import replay

        db.dispose()
        for line in asyncio.run(replay(_load(path), present)):
            console.print(line, highlight=False)
    elif present:
        for mid in present:
            n = revive(db, mid)  # one UPDATE: only dead deliveries change, nothing is reprocessed
            if n:
                console.print(f"{mid}: {n} dead deliver{'y' if n == 1 else 'ies'} queued again", highlight=False)
            else:
                console.print(f"{mid}: no dead deliveries; nothing changed (--reprocess runs it through its "
                              "channel again)", highlight=False)
    if missing:
        raise typer.Exit(1)


@app.command()
def worklist(
    ctx: typer.Context,
    date_: Annotated[
        str | None, typer.Option("--date", help="Scheduled Procedure Step Start Date: 2026-11-25 or 20261125")
    ] = None,
    modality: Annotated[str | None, typer.Option("--modality", help="Modality, e.g. CT, MR, CR, US")] = None,
    station: Annotated[str | None, typer.Option("--station", help="Scheduled Station AE Title")] = None,
    accession: Annotated[str | None, typer.Option("--accession", help="Accession Number")] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="SCHEDULED, IN PROGRESS, CANCELLED, DISCONTINUED or COMPLETED")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many items")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    config: ConfigOpt = None,
) -> None:
    """List worklist items (what modalities see), soonest first."""
    from engine.store.worklist import StepStatus

    day = _day(date_, "--date")
    status = _one_of("--status", status.upper() if status else None, [s.value for s in StepStatus])
    from sqlalchemy import select

    from engine.store.worklist import WorklistItem

    t = WorklistItem.__table__  # type: ignore[attr-defined]  # SQLModel adds __table__ to table classes
    cols = [t.c.id, t.c.accession_number, t.c.patient_id, t.c.sps_start_date, t.c.sps_start_time, t.c.modality,
            t.c.station_aet, t.c.status, t.c.filler_order, t.c.placer_order]
    stmt = select(*cols).order_by(t.c.sps_start, t.c.id).limit(limit)
    for column, value in ((t.c.sps_start_date, day), (t.c.modality, modality), (t.c.station_aet, station),
                          (t.c.accession_number, accession), (t.c.status, status)):
        if value:
            stmt = stmt.where(column == value)
    db, _ = _db(_config_path(ctx, config))
    with db.connect() as conn:
        rows = [dict(r) for r in conn.execute(stmt).mappings()]
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return
    table = Table("id", "accession", "patient id", "date", "time", "modality", "station", "status", "order")
    for r in rows:
        table.add_row(str(r["id"]), *(_cell(r[k]) for k in ("accession_number", "patient_id", "sps_start_date",
                                                          "sps_start_time", "modality", "station_aet", "status")),
                      _cell(r["filler_order"] or r["placer_order"]))
    console.print(table)


# -- medication lists ---------------------------------------------------------------------------
def _medrec_destination(loaded: Any, channel: str | None) -> tuple[str, Any]:
    """(channel, built `medrec` destination) of the named channel, or of the only one that has one."""
    from engine.runtime.app import default_registry

    found = [(spec.config.name, d) for spec in loaded.channels for d in spec.destinations if d.type == "medrec"
             and (channel is None or spec.config.name == channel)]
    if not found:
        _fail(f"channel {channel} has no medrec destination" if channel else "no channel has a medrec destination")
    if len({getattr(d, "list_name", "") or name for name, d in found}) > 1:
        _fail("several channels keep medication lists: name one with --channel")
    name, config = found[0]
    return name, default_registry().build_destination(config, loaded.base_dir)


@app.command("medrec")
def medrec_cmd(
    ctx: typer.Context,
    patient: Annotated[str, typer.Argument(help="patient id (123, Patient/123) as the EMR references it")],
    as_of: Annotated[str | None, typer.Option("--as-of", help="the list as it was on this day: 2026-11-25")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the records (and exclusions) as one JSON object")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="also list each resource left out, and why")] = False,
    channel: Annotated[str | None, typer.Option("--channel", help="channel (default: the one with medrec)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Print a patient's reconciled medication list (one line per medication)."""
    from engine.runtime.destinations.medrec import patient_param

    day = None
    if as_of is not None:
        try:
            day = date.fromisoformat(as_of)
        except ValueError:
            raise typer.BadParameter("expected a date like 2026-11-25", param_hint="--as-of") from None
    from engine.store.db import make_read_engine

    db, loaded = _db(_config_path(ctx, config))
    name, dest = _medrec_destination(loaded, channel)
    key = patient_param(patient)
    with make_read_engine(db).connect() as conn:  # a snapshot: never waits for a running engine's writer
        result = dest.reconciliation(conn, name, key, day, explain=explain)
    if as_json:
        out: dict[str, Any] = {"patient": key, "day": result.day.isoformat(),
                               "records": [r.as_dict() for r in result.records]}
        if explain:
            out["excluded"] = [{"type": e.resource_type, "id": e.id, "status": e.status,
                                "date": e.date.isoformat() if e.date else None, "reason": e.reason}
                               for e in result.excluded]
        sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
        return
    table = Table("medication", "last date", "sources", "status", title=f"{key} on {result.day.isoformat()}")
    for r in result.records:
        sources = ", ".join(f"{s['type'].removeprefix('Medication')} {s['id']} {s['date'] or '-'}" for s in r.sources)
        shown = r.display or ("(unmatched: no code or reference)" if r.unmatched else r.key)
        table.add_row(_cell(shown), _cell(r.date.isoformat() if r.date else "-"), _cell(sources), _cell(r.status))
    console.print(table)
    if not result.records:
        console.print("no medication within the window", highlight=False)
    if explain:
        left = Table("left out", "date", "status", "why", title="not on the list")
        for e in result.excluded:
            left.add_row(_cell(f"{e.resource_type}/{e.id}"), _cell(e.date.isoformat() if e.date else "-"),
                         _cell(e.status), _cell(e.reason))
        console.print(left)


# -- keys ---------------------------------------------------------------------------------------
@app.command()
def status(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """The engine nodes on this store: listeners, heartbeat age, deliveries in flight, the leader."""
    from engine.store import nodes
    from engine.store.models import utcnow
    from engine.store.queue import claims_held

    db, loaded = _db(_config_path(ctx, config))
    lease = loaded.engine.cluster.lease_seconds
    found = nodes.list_nodes(db)
    held = claims_held(db)
    leader = nodes.lease_holder(db, nodes.LEADER)
    now = utcnow()
    table = Table("node", "host", "pid", "mode", "started (UTC)", "heartbeat", "claims", "leader", "listeners")
    for n in found:
        age = (now - n.heartbeat_at).total_seconds()
        beat = f"{age:.0f} s ago" + (" (lapsed)" if age > lease else "")
        table.add_row(
            _cell(n.name), _cell(n.host), str(n.pid), "cluster" if n.cluster else "single",
            n.started_at.strftime("%Y-%m-%d %H:%M:%S"), beat, str(held.get(n.name, 0)),
            "yes" if leader is not None and leader[0] == n.name else "",
            _cell(", ".join(n.listeners)),
        )
    if found:
        console.print(table)
    else:
        console.print("no engine node has registered on this store", highlight=False)
    listed = {n.name for n in found}
    for name, count in sorted(held.items()):
        if name not in listed:  # a node that left its claims behind (they go again once their lease lapses)
            console.print(Text(f"{count} deliveries in flight under {terminal_text(name) or 'no node'}, "
                               "which is not running"), highlight=False)
    if leader is None:
        console.print("leader: none (no live node holds the scheduler lease)", highlight=False)
    else:
        console.print(Text(f"leader: {terminal_text(leader[0])} (lease until "
                           f"{leader[1].strftime('%Y-%m-%d %H:%M:%S')} UTC)"), highlight=False)


@keys_app.command("new")
def keys_new() -> None:
    """Print a fresh random key for ENGINE_KEY (or a line of the ENGINE_KEYRING file)."""
    from engine.store.crypto import new_key

    sys.stdout.write(new_key() + "\n")


def _keyring() -> Any:
    from engine.store import crypto

    try:
        ring = crypto.key_from_env()
    except crypto.KeyConfigError as exc:
        _fail(str(exc))
    crypto.configure(ring)
    return ring


@keys_app.command("status")
def keys_status(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """The configured key ids and how many stored values each key (or none: clear) seals."""
    from engine.store.rekey import key_counts

    ring = _keyring()
    db, _ = _db(_config_path(ctx, config))
    current = ring.current_id()
    console.print(f"current key id: {current or '(none: new values are stored unencrypted)'}", highlight=False)
    for kid in ring.keys:
        if kid.hex() != current:
            console.print(f"old key id (reading only): {kid.hex()}", highlight=False)
    table = Table("column", "sealed with", "rows")
    for column, counts in key_counts(db).items():
        for kid_hex, n in sorted(counts.items()):
            label = kid_hex if kid_hex == "clear" else (
                f"{kid_hex} (current)" if kid_hex == current else
                f"{kid_hex} (old)" if bytes.fromhex(kid_hex) in ring.keys else f"{kid_hex} (NOT CONFIGURED)")
            table.add_row(column, _cell(label), str(n))
    console.print(table)


@keys_app.command("rotate")
def keys_rotate(
    ctx: typer.Context,
    batch: Annotated[int, typer.Option("--batch", min=1, help="rows per transaction")] = 200,
    config: ConfigOpt = None,
) -> None:
    """Re-encrypt every stored value with the current key, beside a running engine.

    Set the new key as ENGINE_KEY and the old one(s) as ENGINE_KEY_OLD (or put the new key first in
    the ENGINE_KEYRING file); values stored unencrypted are encrypted too."""
    from engine.store import crypto
    from engine.store.rekey import rotate

    ring = _keyring()
    if not ring.encrypting:
        _fail(f"{crypto.KEY_ENV} is not set: there is no key to rotate to (make one with `engine keys new`)")
    db, _ = _db(_config_path(ctx, config))
    try:
        done = rotate(db, ring, batch=batch)
    except crypto.UnreadableValue as exc:
        _fail(f"rotation stopped: {exc}")
    for column, n in done.items():
        console.print(f"{column}: {n} value(s) re-encrypted with key id {ring.current_id()}", highlight=False)


def main() -> None:  # pragma: no cover
    app()
