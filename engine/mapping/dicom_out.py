"""Mapping outputs (DICOM keywords -> values) as pydicom Datasets.

Keywords name the elements, the VR comes from pydicom's data dictionary, lists of dicts become
sequences and "" an empty (zero-length) element, which is what a type 2 attribute needs.
"""

from __future__ import annotations

from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence


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
