"""Declarative mappings: YAML rules compiled once into closures over the ER7 message view.

mapping = load_mapping(Path("mappings/orm-to-worklist.yaml"))
outputs = mapping.run(Message.parse(raw), warnings)  # list[dict], one per ORDER group; warnings appended
failures = check_examples(mapping)                # the mapping's own examples
print(render(outputs, mapping.output))
"""

from engine.configfile import Problem
from engine.mapping.conditions import compile_condition
from engine.mapping.context import Settings
from engine.mapping.dicom_out import to_dataset
from engine.mapping.examples import check_examples, map_message
from engine.mapping.formats import FORMATS, FormatRegistry
from engine.mapping.loader import Mapping, MappingConfigError, load_mapping
from engine.mapping.render import render, render_warnings

__all__ = [
    "FORMATS",
    "FormatRegistry",
    "Mapping",
    "MappingConfigError",
    "Problem",
    "Settings",
    "check_examples",
    "compile_condition",
    "load_mapping",
    "map_message",
    "render",
    "render_warnings",
    "to_dataset",
]
