"""The `dicom` source: the channel that takes what the engine's DICOM SCP receives (MPPS).

It listens nowhere itself: the SCP (`dicom:` in engine.yaml, DICOM_AET/DICOM_PORT) owns the port
and serves every DICOM service. This source only hands the app its channel's receiver, which
the MPPS service submits each N-CREATE/N-SET to, from pynetdicom's threads, through
`submitter()`. One enabled channel per engine may have it (checked at load).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import ClassVar

from pydantic import Field

from engine.errors import ProcessingError
from engine.inputs import Outcome
from engine.runtime.registry import Registry
from engine.runtime.sources.base import Endpoint, Receiver, SourceConfig

__all__ = ["DicomSource", "DicomSourceConfig", "Submit", "register"]

log = logging.getLogger(__name__)

Submit = Callable[[bytes], Outcome]


class DicomSourceConfig(SourceConfig):
    type: str = "dicom"
    # how long a DIMSE request waits for its commit before it is answered 0x0110 (the unit may
    # still commit: a resend then gets the stored answer)
    commit_timeout_seconds: float = Field(25.0, gt=0)


class DicomSource:
    Config: ClassVar[type[SourceConfig]] = DicomSourceConfig
    default_input: ClassVar[str] = "dicom"
    one_channel_only: ClassVar[bool] = True
    served_by: ClassVar[str] = "dicom"  # its units arrive on the app's DICOM listener (the banner says so)

    def __init__(self, config: SourceConfig, receiver: Receiver) -> None:
        assert isinstance(config, DicomSourceConfig)
        self.config = config
        self.receiver = receiver
        self._loop: asyncio.AbstractEventLoop | None = None

    def endpoints(self) -> list[Endpoint]:
        return []

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        self._loop = None

    def submit(self, raw: bytes) -> Outcome:
        """Run the unit through the channel on the engine's loop and wait for its committed outcome.
        Called from a pynetdicom thread; never from the loop itself."""
        loop = self._loop
        if loop is None:
            raise ProcessingError("the DICOM channel is not running")
        future = asyncio.run_coroutine_threadsafe(self.receiver.receive(raw), loop)
        try:
            return future.result(timeout=self.config.commit_timeout_seconds)
        except FutureTimeout:
            log.warning("DICOM unit not committed within %.0f s", self.config.commit_timeout_seconds)
            raise ProcessingError("the store did not commit in time") from None


def register(registry: Registry) -> None:
    registry.add_source("dicom", DicomSource)


def channel_submitter(sources: dict[str, object]) -> Submit | None:
    """The running DICOM channel's `submit`, for the SCP's MPPS service (None: no channel takes MPPS)."""
    for name, source in sources.items():
        if isinstance(source, DicomSource):
            log.info("channel %s takes MPPS N-CREATE/N-SET from the DICOM application", name)
            return source.submit
    return None
