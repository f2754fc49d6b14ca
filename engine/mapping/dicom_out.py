"""Mapping outputs (DICOM keywords -> values) as pydicom Datasets.

Keywords name the elements, the VR comes from pydicom's data dictionary, lists of dicts become
sequences and "" an empty (zero-length) element, which is what a type 2 attribute needs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from engine.dicom.vr import check_item
from engine.errors import ProcessingWarning


def to_dataset(d: dict[str, Any], *, validate: bool = False) -> Dataset:
    """Build a Dataset from keyword -> value; ValueError on a key that is not a DICOM keyword.

    validate=True makes pydicom raise on values that break their VR (length, characters).
    """
    mode = config.RAISE if validate else config.IGNORE
    ds = Dataset()
    for key, value in d.items():
        tag = tag_for_keyword(key)
        if tag is None:
            raise ValueError(f"{key!r} is not a DICOM keyword")
        vr = dictionary_VR(tag).split(" or ")[0]
        if vr == "SQ":
            if isinstance(value, dict):
                items = [value] if value else []
            elif isinstance(value, list):
                items = [v for v in value if isinstance(v, dict)]
            elif value in ("", None):
                items = []
            else:
                raise ValueError(f"{key} is a sequence: expected a list of items")
            ds.add(DataElement(tag, "SQ", Sequence([to_dataset(i, validate=validate) for i in items])))
            continue
        if value is None or value == "" or value == []:
            value = None
        elif isinstance(value, dict):
            raise ValueError(f"{key} is not a sequence; got a mapping")
        elif isinstance(value, bool):
            value = str(int(value))
        ds.add(DataElement(tag, vr, value, validation_mode=mode))
    return ds


def check_output(
    output: dict[str, Any],
    *,
    required: Collection[str] = (),
    warnings: list[ProcessingWarning],
    locations: Mapping[str, str] | None = None,
    source: str = "",
) -> dict[str, Any]:
    """A mapped DICOM output with every value valid for its VR (see engine.dicom.vr.check_item).

    A worklist output ({"control", "dataset"}) has its "dataset" checked, any other output the whole
    dict; `output` itself is not changed. Call it once per output, before the output is stored.
    """
    dataset = output.get("dataset")
    if isinstance(dataset, dict):  # "dataset" is no DICOM keyword: this is a worklist output
        checked = check_item(dataset, required=required, warnings=warnings, locations=locations, source=source)
        return output if checked is dataset else {**output, "dataset": checked}
    return check_item(output, required=required, warnings=warnings, locations=locations, source=source)


def output_rules(fields: Any) -> tuple[frozenset[str], dict[str, str]]:
    """From a dicom mapping's `fields.dataset` rules: the keyword paths marked `required: true`
    (for check_output's `required`) and, where a rule reads one field, its HL7 location (ERR-2)."""
    required: set[str] = set()
    locations: dict[str, str] = {}
    dataset = fields.get("dataset") if isinstance(fields, Mapping) else None

    def walk(rules: Any, prefix: str) -> None:
        if not isinstance(rules, Mapping):
            return
        for key, rule in rules.items():
            path = f"{prefix}{key}"
            if isinstance(rule, list):  # a sequence: its item rules
                for item in rule:
                    walk(item, f"{path}.")
                continue
            if not isinstance(rule, Mapping):
                continue
            if rule.get("required") is True:
                required.add(path)
            source = rule.get("from")
            if isinstance(source, list) and len(source) == 1:
                source = source[0]
            if isinstance(source, str):  # of a chain, which field gave the value is not known here
                locations[path] = source

    walk(dataset, "")
    return frozenset(required), locations
