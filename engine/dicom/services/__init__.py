"""The DICOM services the engine ships, registered by name (`engine.dicom.scp.DicomServiceRegistry`).

A new service (MPPS, ...) is one module here with a service class and `register(registry)`,
plus one line in `default_registry`; the application itself does not change.
"""

from __future__ import annotations

from engine.dicom.scp import DicomServiceRegistry
from engine.dicom.services import echo, mpps, mwl

__all__ = ["CHANNEL_SERVICES", "DEFAULT_SERVICES", "default_registry"]

DEFAULT_SERVICES = ("echo", "mwl")
# offered only when a channel takes what it receives (engine.runtime.sources.dicom)
CHANNEL_SERVICES = ("mpps",)


def default_registry() -> DicomServiceRegistry:
    registry = DicomServiceRegistry()
    echo.register(registry)
    mwl.register(registry)
    mpps.register(registry)
    return registry
