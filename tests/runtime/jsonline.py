"""A test-only input kind: one JSON object per line over TCP, answered with one JSON line.

It exists to show that a second protocol is one adapter and one source, registered like any
component, with no edit to the pipeline, the writer or the queue.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field

from engine.errors import DATA_TYPE_ERROR, REQUIRED_FIELD_MISSING, ProcessingError, ProcessingWarning
from engine.inputs import AdapterOptions, AnswerBuilder, Outcome, Received
from engine.runtime.registry import Registry
from engine.runtime.sources.base import Endpoint, Receiver, SourceConfig


class JsonView:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def get(self, path: str) -> str:
        value = self.data.get(path, "")
        return "" if value is None else str(value)


class JsonOptions(AdapterOptions):
    type: Literal["json-test"] = "json-test"
    strict: bool = False  # a test-only option, validated like any adapter's


class JsonAdapter:
    name: ClassVar[str] = "json-test"
    Options: ClassVar[type[AdapterOptions]] = JsonOptions
    content_type: ClassVar[str] = "application/json"
    type_location: ClassVar[str] = "kind"

    def __init__(self, options: AdapterOptions) -> None:
        self.options = options

    def parse(self, raw: bytes) -> Received:
        try:
            data = json.loads(raw)
        except ValueError:
            raise ProcessingError("not a JSON object", DATA_TYPE_ERROR) from None
        if not isinstance(data, dict):
            raise ProcessingError("not a JSON object", DATA_TYPE_ERROR)
        unit = Received(
            view=JsonView(data),
            message_type=str(data.get("kind", "")),
            control_id=str(data.get("id", "")),
            sender=str(data.get("from", "")),
            patient_id=str(data.get("patient", "")),
        )
        if "note" in data and len(str(data["note"])) > 10:
            unit.warnings.append(ProcessingWarning("note cut to 10 characters", DATA_TYPE_ERROR, "note"))
        return unit

    def check(self, unit: Received) -> None:
        if not unit.control_id:
            raise ProcessingError("id is missing", REQUIRED_FIELD_MISSING, "id")

    def answer(self, unit: Received) -> AnswerBuilder:
        def build(status: str, error: ProcessingError | None, warnings: Sequence[ProcessingWarning]) -> str:
            body: dict[str, Any] = {"id": unit.control_id, "status": status}
            if error is not None:
                body["error"] = {"code": error.code, "at": error.location, "text": error.text}
            if warnings:
                body["warnings"] = [w.location for w in warnings]
            return json.dumps(body, sort_keys=True)

        return build

    def refusal(self, raw: bytes) -> tuple[AnswerBuilder, str]:
        def build(status: str, error: ProcessingError | None, warnings: Sequence[ProcessingWarning]) -> str:
            return json.dumps({"status": "refused", "error": error.text if error else ""}, sort_keys=True)

        return build, "utf-8"

    def split(self, raw: bytes) -> list[bytes] | None:
        return None

    def combine(self, outcomes: Sequence[Outcome]) -> bytes:
        return b"\n".join(o.answer_bytes() for o in outcomes)


class JsonLineConfig(SourceConfig):
    type: str = "jsonline"
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("jsonline", self.host, self.port)]


class JsonLineSource:
    Config: ClassVar[type[SourceConfig]] = JsonLineConfig
    default_input: ClassVar[str] = "json-test"

    def __init__(self, config: SourceConfig, receiver: Receiver) -> None:
        assert isinstance(config, JsonLineConfig)
        self.config = config
        self.receiver = receiver
        self.server: asyncio.Server | None = None

    def endpoints(self) -> list[Endpoint]:
        port = self.server.sockets[0].getsockname()[1] if self.server else self.config.port
        return [Endpoint("jsonline", self.config.host, port)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                outcome = await self.receiver.receive(line.strip())
                writer.write(outcome.answer_bytes() + b"\n")  # the source owns the reply
                await writer.drain()
        finally:
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.config.host, self.config.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


def register(registry: Registry) -> None:
    registry.add_source("jsonline", JsonLineSource)
    registry.add_adapter(JsonAdapter)
