"""The DICOM SCP: one application (one AE title, one port) serving every registered service.

As dcm4che's `DicomServiceRegistry`: a service says which SOP classes it serves and which
pynetdicom events it handles; the application accepts the union of those SOP classes and routes
each DIMSE request by its presentation context's SOP class to the service that claims it. So MWL
C-FIND and a later Query/Retrieve C-FIND can share pynetdicom's single EVT_C_FIND slot. A SOP
class (or an association-level intervention such as EVT_USER_ID) claimed by two services is
refused when the application is built, before any port is opened. Notification events (EVT_CONN_OPEN,
...) may have any number of observers.

Two pynetdicom defaults are changed: accepted sockets get TCP_NODELAY (otherwise an answer split
over PDUs waits ~40 ms on Nagle + delayed ACK), and pynetdicom's logger is held at WARNING because
it logs query identifiers (PHI) at lower levels.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pynetdicom import AE, _config, evt
from pynetdicom.events import Event, EventHandlerType, EventType, InterventionEvent
from sqlalchemy import Engine

__all__ = [
    "DicomApplication",
    "DicomService",
    "DicomServiceRegistry",
    "Handler",
    "ServiceConflict",
    "ServiceContext",
    "ServiceFactory",
    "caller_aet",
    "caller_allowed",
    "quiet_pynetdicom",
    "set_nodelay",
]

log = logging.getLogger(__name__)

Handler = Callable[[Event], Any]

SOP_CLASS_NOT_SUPPORTED = 0x0122

# intervention events that concern the association, not a SOP class: exactly one service may take each
ASSOCIATION_EVENTS = frozenset({evt.EVT_ASYNC_OPS, evt.EVT_SOP_COMMON, evt.EVT_SOP_EXTENDED, evt.EVT_USER_ID})


def quiet_pynetdicom() -> None:
    """pynetdicom logs (and decodes twice to log) identifiers, which hold PHI: switch that off process-wide."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def set_nodelay(sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # pragma: no cover - closed or non-TCP socket
        pass


def caller_aet(event: Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def caller_allowed(event: Event) -> bool:
    """The application's allowlist, checked again inside a service (pynetdicom refuses others at A-ASSOCIATE)."""
    allowed = [a.strip() for a in event.assoc.ae.require_calling_aet]
    return not allowed or caller_aet(event) in allowed


class DicomService(Protocol):
    """One DICOM service of the application (worklist C-FIND, MPPS, C-ECHO, ...)."""

    @property
    def name(self) -> str: ...

    @property
    def sop_classes(self) -> Sequence[str]:
        """SOP Class UIDs served as SCP (pynetdicom's `sop_class` objects are UIDs)."""
        ...

    def handlers(self) -> list[tuple[EventType, Handler]]:
        """pynetdicom (event, handler) pairs; DIMSE events are routed to this service for its SOP classes only."""
        ...


class ServiceConflict(ValueError):
    """Two services claim the same SOP class, association-level event or name."""


@dataclass(frozen=True)
class ServiceContext:
    """What the engine hands a service factory: the store and the `dicom:` settings of engine.yaml."""

    db: Engine | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)


ServiceFactory = Callable[[ServiceContext], DicomService]


class DicomServiceRegistry:
    """Service factories by name; a new service is one module whose `register(registry)` adds it here."""

    def __init__(self) -> None:
        self._factories: dict[str, ServiceFactory] = {}

    def add(self, name: str, factory: ServiceFactory) -> None:
        if name in self._factories:
            raise ServiceConflict(f"DICOM service {name!r} is registered twice")
        self._factories[name] = factory

    def names(self) -> list[str]:
        return sorted(self._factories)

    def build(self, names: Iterable[str], context: ServiceContext) -> list[DicomService]:
        services = []
        for name in names:
            factory = self._factories.get(name)
            if factory is None:
                raise KeyError(f"unknown DICOM service {name!r} (known: {', '.join(self.names()) or 'none'})")
            services.append(factory(context))
        return services


def _refusal(kind: EventType) -> Any:
    """A request for a SOP class whose service does not handle this DIMSE: 0x0122, in the handler's shape."""
    if kind in (evt.EVT_C_ECHO, evt.EVT_C_STORE, evt.EVT_N_DELETE):
        return SOP_CLASS_NOT_SUPPORTED
    if kind is evt.EVT_C_FIND:
        return iter([(SOP_CLASS_NOT_SUPPORTED, None)])
    if kind in (evt.EVT_N_GET, evt.EVT_N_SET, evt.EVT_N_CREATE, evt.EVT_N_ACTION, evt.EVT_N_EVENT_REPORT):
        return SOP_CLASS_NOT_SUPPORTED, None
    # C-GET / C-MOVE generators open with a sub-operation count; pynetdicom answers a raise with a failure
    raise LookupError(f"no service handles {kind.name} for this SOP class")


class _Router:
    """The one handler pynetdicom gets for a DIMSE intervention event: picks the owner by SOP class."""

    def __init__(self, kind: InterventionEvent) -> None:
        self.kind = kind
        self.by_sop_class: dict[str, Handler] = {}

    def __call__(self, event: Event) -> Any:
        handler = self.by_sop_class.get(str(event.context.abstract_syntax))
        if handler is None:
            log.warning("%s from %s: no service for this SOP class", self.kind.name, caller_aet(event))
            return _refusal(self.kind)
        return handler(event)


class DicomApplication:
    """One pynetdicom AE on (host, port) serving `services`. Construction checks them and does no I/O;
    `start()` opens the port and returns at once; `stop()` closes it."""

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int,
        services: Sequence[DicomService],
        *,
        allowed_callers: Sequence[str] | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self._port = port
        self.allowed_callers = [a.strip() for a in allowed_callers] if allowed_callers else []
        self.services = list(services)
        self._sop_owner: dict[str, str] = {}  # SOP class UID -> service name
        self._routers: dict[InterventionEvent, _Router] = {}
        self._association: dict[EventType, tuple[str, Handler]] = {}
        self._observers: list[tuple[EventType, Handler]] = []
        self._build()
        self._ae: AE | None = None
        self._server: Any = None

    def _build(self) -> None:
        names: set[str] = set()
        for service in self.services:
            if service.name in names:
                raise ServiceConflict(f"DICOM service {service.name!r} is given twice")
            names.add(service.name)
            uids = [str(uid) for uid in service.sop_classes]
            for uid in uids:
                owner = self._sop_owner.setdefault(uid, service.name)
                if owner != service.name:
                    raise ServiceConflict(f"SOP class {uid} is claimed by services {owner!r} and {service.name!r}")
            self._bind(service, uids)

    def _bind(self, service: DicomService, uids: list[str]) -> None:
        seen: set[EventType] = set()
        for kind, handler in service.handlers():
            if kind.is_notification:
                self._observers.append((kind, handler))
                continue
            if kind in seen:
                raise ServiceConflict(f"DICOM service {service.name!r} binds {kind.name} twice")
            seen.add(kind)
            if kind in ASSOCIATION_EVENTS:
                other = self._association.setdefault(kind, (service.name, handler))[0]
                if other != service.name:
                    raise ServiceConflict(f"{kind.name} is claimed by DICOM services {other!r} and {service.name!r}")
                continue
            if not uids:
                raise ServiceConflict(f"DICOM service {service.name!r} handles {kind.name} for no SOP class")
            router = self._routers.setdefault(kind, _Router(kind))  # type: ignore[arg-type]  # not a notification
            for uid in uids:
                router.by_sop_class[uid] = handler

    @property
    def sop_classes(self) -> list[str]:
        """Every SOP class UID the application accepts, in service order."""
        return list(self._sop_owner)

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    def _evt_handlers(self) -> list[EventHandlerType]:
        pairs: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, self._on_open)]
        pairs += self._observers
        pairs += [(kind, handler) for kind, (_name, handler) in self._association.items()]
        pairs += list(self._routers.items())
        return pairs

    def start(self) -> None:
        quiet_pynetdicom()
        ae = AE(ae_title=self.ae_title)
        for uid in self._sop_owner:
            ae.add_supported_context(uid)
        if self.allowed_callers:
            ae.require_calling_aet = self.allowed_callers  # others get A-ASSOCIATE-RJ
        self._server = ae.start_server((self.host, self._port), block=False, evt_handlers=self._evt_handlers())
        self._ae = ae
        log.info(
            "DICOM application %s listening on %s:%d (%s)",
            self.ae_title,
            self.host,
            self.port,
            ", ".join(s.name for s in self.services),
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    @staticmethod
    def _on_open(event: Event) -> None:
        set_nodelay(event.assoc.dul.socket.socket)  # type: ignore[union-attr]  # open: the socket exists
