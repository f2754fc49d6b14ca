"""C-ECHO (Verification): the modality's "test connection" button."""

from __future__ import annotations

from pynetdicom import evt
from pynetdicom.events import Event, EventType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # pynetdicom makes its SOP classes at import

from engine.dicom.scp import DicomServiceRegistry, Handler, ServiceContext

__all__ = ["EchoService", "register"]

SUCCESS = 0x0000


class EchoService:
    name = "echo"
    sop_classes = (Verification,)

    def handlers(self) -> list[tuple[EventType, Handler]]:
        return [(evt.EVT_C_ECHO, self.on_echo)]

    @staticmethod
    def on_echo(_event: Event) -> int:
        return SUCCESS


def register(registry: DicomServiceRegistry) -> None:
    def factory(_context: ServiceContext) -> EchoService:
        return EchoService()

    registry.add(EchoService.name, factory)
