"""The CLI in-process (typer's CliRunner) against the shipped configuration on a fresh SQLite store."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import Engine, insert
from typer.testing import CliRunner

from engine.cli import app
from engine.store.db import init_db, make_engine
from engine.store.models import Delivery, Message

ROOT = Path(__file__).resolve().parents[2]

MESSAGES = Message.__table__  # type: ignore[attr-defined]
DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]


def engine_env(tmp_path: Path) -> dict[str, str]:
    """The shipped configuration with its store and folders under tmp_path (the listeners are not started)."""
    return {
        "ENGINE_STORAGE_URL": f"sqlite:///{tmp_path / 'engine.db'}",
        "ORDERS_ARCHIVE_DIR": str(tmp_path / "archive"),
        "RESULTS_OUTBOX_DIR": str(tmp_path / "outbox"),
        "ORDERS_MLLP_PORT": "0",
        "RESULTS_MLLP_PORT": "0",
        "DICOM_PORT": "0",
        "HTTP_PORT": "0",
        "MEDS_ARCHIVE_DIR": str(tmp_path / "meds-archive"),
    }


class Cli:
    def __init__(self, tmp_path: Path) -> None:
        self.env: dict[str, str | None] = {**engine_env(tmp_path), "ENGINE_CONFIG": None}
        self.runner = CliRunner()
        self.db_url = str(self.env["ENGINE_STORAGE_URL"])
        self._db: Engine | None = None

    def __call__(self, *args: str, code: int | None = 0) -> Result:
        """Run `engine ARGS` with the shipped engine.yaml (-c given after the subcommand); check the exit code."""
        result = self.runner.invoke(app, list(args), env=self.env)
        if code is not None:
            assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
        assert "Traceback" not in result.output
        return result

    @staticmethod
    def flat(text: str) -> str:
        """Text without the box and line breaks typer draws around usage errors."""
        return re.sub(r"[\s│╭╮╰╯─]+", " ", text)

    @property
    def db(self) -> Engine:
        if self._db is None:
            self._db = make_engine(self.db_url)
            init_db(self._db)
        return self._db

    def add_message(self, channel: str = "ris-orders", *, status: str = "processed", control_id: str = "C1",
                    warnings: list[dict[str, Any]] | None = None, dead: int = 0, done: int = 0,
                    received_at: datetime | None = None) -> int:
        body = (f"MSH|^~\\&|RIS|RADIOLOGY|ENGINE|HOSPITAL|20261124153000||ORM^O01|{control_id}|P|2.3.1\r"
                "PID|1||100234^^^HOSP^MR||Doe^Jane\r").encode()
        with self.db.begin() as conn:
            mid = conn.execute(insert(MESSAGES).values(
                channel=channel, control_id=control_id, message_type="ORM^O01", patient_id="100234", raw=body,
                status=status, received_at=received_at or datetime(2026, 11, 25, 10, 0, tzinfo=UTC),
                error="", ack="", flags="", warnings=json.dumps(warnings) if warnings else "",
            )).inserted_primary_key[0]
            for state, n in (("dead", dead), ("done", done)):
                for _ in range(n):
                    conn.execute(insert(DELIVERIES).values(
                        message_id=mid, channel=channel, destination="archive", state=state, attempts=3,
                        payload=body, last_error="not delivered: ConnectionRefusedError", response="",
                    ))
        return int(mid)

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    c = Cli(tmp_path)
    yield c
    c.close()


