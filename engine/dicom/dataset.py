"""Worklist item (contract dict: DICOM keywords -> DICOM-formatted strings) <-> pydicom Dataset.

Text stays Python `str`; pydicom encodes it on the wire per the SpecificCharacterSet we set:
ISO_IR 192 when any returned text is non-ASCII (ISO_IR 100 when the query asked for Latin-1 and
it suffices), nothing when the answer is plain ASCII (the default repertoire).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from engine.dicom.matching import SPS_SEQ, value_text

__all__ = ["build_response", "dataset_to_item", "item_to_dataset", "set_charset"]

_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "IS", "DS", "AT", "UV", "SV"})


def _element_value(vr: str, value: Any) -> Any:
    if value is None or value == "":
        return None if vr in _NUMERIC_VRS else ""
    if isinstance(value, list):
        return [_element_value(vr, v) for v in value]
    if vr in _NUMERIC_VRS or "\\" not in str(value) or vr in ("LT", "ST", "UT"):
        return value
    return str(value).split("\\")


def item_to_dataset(item: Mapping[str, Any]) -> Dataset:
    """The whole item as a Dataset; keys that are not DICOM keywords are skipped."""
    ds = Dataset()
    for keyword, value in item.items():
        tag = keyword_dict.get(keyword)
        if tag is None:
            continue
        vr = dictionary_VR(tag)
        if vr == "SQ":
            items = value if isinstance(value, list) else []
            ds.add_new(tag, "SQ", Sequence([item_to_dataset(v) for v in items if isinstance(v, dict)]))
        else:
            ds.add_new(tag, vr.split(" or ")[0], _element_value(vr, value))
    return ds


def dataset_to_item(ds: Dataset) -> dict[str, Any]:
    """A Dataset as a contract dict (strings, lists of dicts for sequences)."""
    out: dict[str, Any] = {}
    for elem in ds:
        if not elem.keyword or elem.tag.element == 0:
            continue
        if elem.VR == "SQ":
            out[elem.keyword] = [dataset_to_item(d) for d in elem.value or []]
        else:
            out[elem.keyword] = value_text(elem.value)
    return out


def _response(
    query: Dataset, item: Mapping[str, Any], steps: list[dict[str, Any]] | None, hoisted: set[str]
) -> Dataset:
    out = Dataset()
    for elem in query:
        tag, vr, kw = elem.tag, str(elem.VR), elem.keyword
        if tag.element == 0 or tag == 0x00080005:
            continue
        if vr == "SQ":
            stored = steps if (kw == SPS_SEQ and steps is not None) else item.get(kw)
            stored = [s for s in stored if isinstance(s, dict)] if isinstance(stored, list) else []
            q_items = list(elem.value or [])
            if q_items and len(q_items[0]):
                seq = [_response(q_items[0], s, None, set()) for s in stored]
            else:
                seq = [item_to_dataset(s) for s in stored]
            out.add_new(tag, "SQ", Sequence(seq))
            continue
        if not kw:
            out.add_new(tag, vr, None if vr in _NUMERIC_VRS else "")
            continue
        value = item.get(kw)
        if (value is None or value == "") and kw in hoisted and steps:
            value = steps[0].get(kw)
        out.add_new(tag, vr, _element_value(vr, value_text(value) if not isinstance(value, list) else value))
    return out


def _texts(ds: Dataset) -> list[str]:
    found: list[str] = []
    for elem in ds:
        if elem.VR == "SQ":
            for sub in elem.value or []:
                found.extend(_texts(sub))
        elif isinstance(elem.value, str):
            found.append(elem.value)
        elif elem.VR == "PN" and elem.value is not None:
            found.append(str(elem.value))
        elif isinstance(elem.value, (list, MultiValue)):  # MultiValue is no list
            found.extend(str(v) for v in elem.value)
    return found


def set_charset(ds: Dataset, requested: str = "") -> None:
    """Declare the character set the answer's text needs (always present in answers).

    Plain ASCII: the requested Latin-1/UTF-8 value is echoed, else "" (default repertoire).
    Non-ASCII: ISO_IR 100 when the query asked for it and Latin-1 suffices, else ISO_IR 192.
    """
    text = "".join(_texts(ds))
    if text.isascii():
        ds.SpecificCharacterSet = requested if requested in ("ISO_IR 100", "ISO_IR 192") else ""
        return
    if requested == "ISO_IR 100":
        try:
            text.encode("latin-1")
            ds.SpecificCharacterSet = "ISO_IR 100"
            return
        except UnicodeEncodeError:
            pass
    ds.SpecificCharacterSet = "ISO_IR 192"


def build_response(
    query: Dataset,
    item: Mapping[str, Any],
    *,
    steps: list[dict[str, Any]] | None = None,
    hoisted: set[str] | None = None,
) -> Dataset:
    """The answer to `query` for one item: every query key, valued from the item (zero length if absent).

    `steps` are the SPS items to return (the matching ones); `hoisted` are SPS keys the query put
    at top level, answered from the SPS item.
    """
    out = _response(query, item, steps, hoisted or set())
    requested = value_text(query["SpecificCharacterSet"].value) if "SpecificCharacterSet" in query else ""
    set_charset(out, requested.split("\\")[0].strip())
    return out
