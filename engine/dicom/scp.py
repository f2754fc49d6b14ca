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

Admission happens at A-ASSOCIATE-RQ (EVT_REQUESTED), before anything else: the calling AE must
be in the allowlist and the called AE must be ours (AE titles compare exactly, except that leading
and trailing spaces are not significant, PS3.5 6.2), then the caller gets a slot
(`engine.dicom.slots`): at the limit the association idle longest is aborted to make room, so an
idle crowd never locks a modality out. With TLS the handshake runs in the connection's own thread
with the ACSE timeout, never in the accept loop (pynetdicom's own TLS wrap would let one silent
client stop every other one from connecting).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom import config as pydicom_config
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event, EventHandlerType, EventType, InterventionEvent
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine

from engine.dicom.slots import AssociationSlots, SlotRefused
from engine.inputs import Outcome

__all__ = [
    "DicomApplication",
    "DicomService",
    "DicomServiceRegistry",
    "DicomTimeouts",
    "Handler",
    "ServiceConflict",
    "ServiceContext",
    "ServiceFactory",
    "ae_title_key",
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
    """pynetdicom logs (and decodes twice to log) identifiers, which hold PHI: switch that off process-wide
    (and pydicom's warnings that quote invalid values)."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom warns with the value when it reads one invalid for its VR (a birth date is PHI);
    # the engine judges values itself
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def set_nodelay(sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # pragma: no cover - closed or non-TCP socket
        pass


def ae_title_key(title: str) -> str:
    """An AE title as DICOM compares it: leading/trailing spaces are not significant, everything else is
    (case included), so "MODALITY1 " == "MODALITY1" but "MODALITY1X" and "modality1" are other AEs."""
    return title.strip(" ")


def caller_aet(event: Event) -> str:
    return ae_title_key(str(event.assoc.requestor.ae_title))


def caller_allowed(event: Event) -> bool:
    """The application's allowlist, checked again inside a service (the application refuses others at A-ASSOCIATE)."""
    allowed = [ae_title_key(a) for a in event.assoc.ae.require_calling_aet]
    return not allowed or caller_aet(event) in allowed


# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognized
REJECT_CALLED_AET = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognized
REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded


@dataclass(frozen=True)
class DicomTimeouts:
    """pynetdicom's three timeouts, in seconds. `network` closes an association silent that long: long
    enough for a modality that keeps its association open while the technologist picks a patient;
    crowds are handled by slot eviction, not by this."""

    network: float | None = 300.0
    acse: float = 30.0
    dimse: float = 30.0


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
    """What the engine hands a service factory: the store, the `dicom:` settings of engine.yaml and,
    when a channel takes DICOM units (MPPS), `submit`: runs one raw unit (C1) through that channel
    and returns its committed outcome (called from pynetdicom's threads, it blocks)."""

    db: Engine | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    submit: Callable[[bytes], Outcome] | None = None


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
    """The one handler pynetdicom gets for a DIMSE intervention event: picks the owner by SOP class,
    and marks the association busy (not to be displaced) while the operation runs."""

    def __init__(self, kind: InterventionEvent, slots: AssociationSlots) -> None:
        self.kind = kind
        self.slots = slots
        self.by_sop_class: dict[str, Handler] = {}

    def __call__(self, event: Event) -> Any:
        handler = self.by_sop_class.get(str(event.context.abstract_syntax))
        if handler is None:
            log.warning("%s from %s: no service for this SOP class", self.kind.name, caller_aet(event))
            return _refusal(self.kind)
        key = event.assoc
        self.slots.begin(key)
        try:
            result = handler(event)
        except BaseException:
            self.slots.end(key)
            raise
        if isinstance(result, Iterator):
            return self._tracked(key, result)
        self.slots.end(key)
        return result

    def _tracked(self, key: Any, answers: Iterator[Any]) -> Iterator[Any]:
        try:
            for answer in answers:
                self.slots.touch(key)
                yield answer
        finally:
            self.slots.end(key)


class _TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved out of the accept loop into the
    connection's thread, bounded by `handshake_timeout`."""

    tls: ssl.SSLContext
    handshake_timeout: float

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        return self.tls.wrap_socket(client, server_side=True, do_handshake_on_connect=False), address

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.handshake_timeout)
            request.do_handshake()
            request.settimeout(None)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning("DICOM TLS handshake from %s failed: %s", client_address[0], type(exc).__name__)
            self.shutdown_request(request)
            return
        super().finish_request(request, client_address)


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
        check_called_aet: bool = True,
        max_associations: int = 32,
        max_associations_per_caller: int = 8,
        timeouts: DicomTimeouts = DicomTimeouts(),
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self._port = port
        self.allowed_callers = [ae_title_key(a) for a in allowed_callers] if allowed_callers else []
        self.check_called_aet = check_called_aet
        self.slots = AssociationSlots(max_associations, max_associations_per_caller)
        self.timeouts = timeouts
        self.tls = tls
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
            router = self._routers.setdefault(kind, _Router(kind, self.slots))  # type: ignore[arg-type]  # not a notification
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
        pairs: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
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
            ae.require_calling_aet = self.allowed_callers  # checked first in _on_requested; this is a second lock
        ae.require_called_aet = self.check_called_aet
        # our slots decide; pynetdicom's own limit only backs them up (it also counts connections that
        # have not sent A-ASSOCIATE-RQ yet, which the ACSE timeout closes)
        ae.maximum_associations = 4 * self.slots.max_associations + 16
        ae.network_timeout = self.timeouts.network
        ae.acse_timeout = self.timeouts.acse
        ae.dimse_timeout = self.timeouts.dimse
        address = (self.host, self._port)
        if self.tls is None:
            self._server = ae.start_server(address, block=False, evt_handlers=self._evt_handlers())
        else:
            server = ae.make_server(address, evt_handlers=self._evt_handlers(), server_class=_TlsAssociationServer)
            assert isinstance(server, _TlsAssociationServer)
            server.tls = self.tls
            server.handshake_timeout = self.timeouts.acse
            threading.Thread(target=server.serve_forever, name="dicom-tls-acceptor", daemon=True).start()
            ae._servers.append(server)  # as start_server does: the server's shutdown() removes it there
            self._server = server
        self._ae = ae
        log.info(
            "DICOM application %s listening on %s:%d%s (%s)",
            self.ae_title,
            self.host,
            self.port,
            " (TLS)" if self.tls is not None else "",
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

    def _on_requested(self, event: Event) -> None:
        """A-ASSOCIATE-RQ: allowlist, called AE, then a slot (displacing the idlest association if need be)."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        if request is None:  # pragma: no cover - pynetdicom sets it before EVT_REQUESTED
            return
        caller = ae_title_key(str(request.calling_ae_title))
        if self.allowed_callers and caller not in self.allowed_callers:
            log.warning("A-ASSOCIATE-RJ for calling AE %r: not in allowed_callers", caller)
            self._reject(event, REJECT_CALLING_AET)
            return
        called = ae_title_key(str(request.called_ae_title))
        if self.check_called_aet and called != ae_title_key(self.ae_title):
            log.warning("A-ASSOCIATE-RJ for calling AE %r: called AE %r is not %s", caller, called, self.ae_title)
            self._reject(event, REJECT_CALLED_AET)
            return
        try:
            evicted = self.slots.admit(assoc, caller)
        except SlotRefused as exc:
            log.warning("A-ASSOCIATE-RJ for calling AE %r: %s", caller, exc)
            self._reject(event, REJECT_LIMIT)
            return
        for gone in evicted:
            log.warning(
                "DICOM association of %r idle %.0f s aborted to admit %r (limits: %d associations, %d per caller)",
                gone.caller,
                gone.idle_seconds,
                caller,
                self.slots.max_associations,
                self.slots.max_per_caller,
            )
            # abort() blocks until the peer's connection is down: not on the newcomer's thread
            threading.Thread(target=_abort, args=(gone.key,), name="dicom-evict", daemon=True).start()

    @staticmethod
    def _reject(event: Event, reason: tuple[int, int, int]) -> None:
        assoc = event.assoc
        assoc.acse.send_reject(*reason)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()  # as pynetdicom does after its own rejections: the RJ goes out before the socket closes

    def _on_close(self, event: Event) -> None:
        self.slots.leave(event.assoc)


def _abort(assoc: Any) -> None:
    try:
        assoc.abort()
    except Exception as exc:  # pragma: no cover - the peer went away meanwhile
        log.info("aborting a displaced DICOM association: %s", type(exc).__name__)
