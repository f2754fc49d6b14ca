"""Write the raw message, or the mapped outputs as JSON, into a folder.

Queued like any remote delivery; the file is written to a temporary name, fsynced and renamed,
so a reader never sees half a file and a re-delivery after a crash rewrites the same name. Files
are 0600 and folders the engine creates 0700, whatever the umask (they hold PHI).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from engine.runtime.destinations.base import (
    OUTPUT_KINDS,
    RAW,
    DeliveryOutcome,
    DestinationConfig,
    MessageContext,
    Payload,
    QueuedDestination,
)
from engine.runtime.registry import Registry
from engine.store import files

# file name extension by content type; anything else is written as .bin
EXTENSIONS = {"x-application/hl7-v2+er7": "hl7", "application/json": "json", "application/fhir+json": "json"}


class FileDestinationConfig(DestinationConfig):
    directory: str
    content: Literal["raw", "mapped"] = "raw"
    filename: str = "{channel}-{message_id}.{ext}"
    fsync: bool = True


class FileDestination(QueuedDestination):
    Config: ClassVar[type[DestinationConfig]] = FileDestinationConfig
    config: FileDestinationConfig

    @classmethod
    def takes(cls, config: DestinationConfig) -> frozenset[str]:
        """Raw bytes of any input, or any mapping's outputs as JSON."""
        assert isinstance(config, FileDestinationConfig)
        return frozenset({RAW}) if config.content == "raw" else OUTPUT_KINDS

    def __init__(self, config: DestinationConfig, *, base_dir: Any = None) -> None:
        super().__init__(config, base_dir=base_dir)
        folder = Path(self.config.directory)
        self.folder = folder if folder.is_absolute() or base_dir is None else Path(base_dir) / folder

    async def start(self) -> None:
        files.private_dir(self.folder)

    def payloads(self, ctx: MessageContext, outputs: list[Any]) -> list[Payload]:
        # files need no order among themselves: a key per message keeps the queue parallel
        if self.config.content == "raw":
            return [Payload(ctx.raw, ordering_key=ctx.control_id, content_type=ctx.content_type)]
        body = json.dumps(outputs, ensure_ascii=False, indent=1).encode("utf-8")
        return [Payload(body, ordering_key=ctx.control_id, content_type="application/json")]

    async def deliver(self, payload: Payload) -> DeliveryOutcome:
        name = self.config.filename.format(
            channel=payload.meta.get("channel", self.name),
            message_id=payload.meta.get("message_id", "x"),
            ext=EXTENSIONS.get(payload.content_type, "bin"),
        )
        try:
            await asyncio.to_thread(self._write, self.folder / name, payload.body)
        except OSError as exc:
            return DeliveryOutcome(ok=False, retry=True, error=f"cannot write {name}: {exc.strerror}")
        return DeliveryOutcome(ok=True, response=name)

    def _write(self, path: Path, body: bytes) -> None:
        files.private_dir(path.parent)
        tmp = path.with_name(path.name + ".part")
        with open(files.open_private(tmp), "wb") as fh:
            fh.write(body)
            if self.config.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)


def register(registry: Registry) -> None:
    registry.add_destination("file", FileDestination)
