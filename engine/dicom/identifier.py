"""A C-FIND identifier read strictly enough to tell a query from garbage.

pynetdicom decodes lazily and pydicom reads almost any bytes as *some* dataset: four garbage bytes
become one element with an unknown tag and a cut value, which matches nothing, so every item
came back with Success. Here the identifier must decode fully, its elements must be in ascending
tag order with values as long as their declared length (PS3.5 7.1) and public tags must be known;
otherwise it is `UndecodableIdentifier` (answered 0xC000). An identifier without any attribute to
match or return is `EmptyIdentifier` (answered 0xA900).
"""

from __future__ import annotations

from pydicom import datadict
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pynetdicom.events import Event

__all__ = ["EmptyIdentifier", "UndecodableIdentifier", "read_identifier"]

UNDEFINED_LENGTH = 0xFFFFFFFF
# present in an identifier without asking for anything
_NOT_KEYS = frozenset({0x00080005})  # SpecificCharacterSet


class UndecodableIdentifier(ValueError):
    """The identifier's bytes are not a dataset."""


class EmptyIdentifier(ValueError):
    """A dataset without a single matching or return key."""


def _check(ds: Dataset, depth: int = 0) -> None:
    if depth > 8:
        raise UndecodableIdentifier("sequences nested too deep")
    previous = -1
    for tag in list(ds._dict):  # file order: raw elements are kept as read
        if tag <= previous:
            raise UndecodableIdentifier("elements out of tag order")
        previous = tag
        raw = ds._dict[tag]
        if isinstance(raw, RawDataElement):
            value = raw.value or b""
            if raw.length != UNDEFINED_LENGTH and len(value) != raw.length:
                raise UndecodableIdentifier("element value shorter than its length")
        is_private = bool(tag >> 16 & 1)
        if not is_private and tag & 0xFFFF and not datadict.dictionary_has_tag(tag):
            raise UndecodableIdentifier("unknown public tag")
        element = ds[tag]  # converts the raw element: a bad VR or value raises here
        if element.VR == "SQ":
            for item in element.value:
                _check(item, depth + 1)


def _check_consumed(event: Event, identifier: Dataset) -> None:
    """pydicom stops quietly at bytes it cannot read as an element: every byte must belong to one."""
    stream = getattr(event.request, "Identifier", None)  # C-FIND, C-GET, C-MOVE carry one
    size = len(stream.getvalue()) if stream is not None else 0
    if not size or event.context.transfer_syntax.is_deflated:  # deflated: offsets count inflated bytes
        return
    if not identifier._dict:
        raise UndecodableIdentifier("no element in the identifier's bytes")
    last = list(identifier._dict.values())[-1]
    if isinstance(last, RawDataElement) and last.length != UNDEFINED_LENGTH:
        if last.value_tell + last.length != size:
            raise UndecodableIdentifier("bytes after the last element")


def read_identifier(event: Event) -> Dataset:
    """The request's identifier, checked; raises UndecodableIdentifier or EmptyIdentifier."""
    try:
        identifier = event.identifier
        _check(identifier)
        _check_consumed(event, identifier)
    except UndecodableIdentifier:
        raise
    except Exception as exc:  # whatever pydicom raises on bytes that are not a dataset
        raise UndecodableIdentifier(type(exc).__name__) from exc
    if not any(tag not in _NOT_KEYS and tag & 0xFFFF and not tag >> 16 & 1 for tag in identifier._dict):
        raise EmptyIdentifier("no matching or return key")
    return identifier
