"""The mapping file's header, settings and examples as pydantic models (like the channel files).

`fields:` is a free tree of targets whose rule keys depend on the formats a rule names: the
compiler checks it, with the same file:line:col key: message problems.
"""

from __future__ import annotations

import difflib
import types
from typing import Any, Literal, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.configfile import Problem, YamlDocument
from engine.mapping.formats import valid_uid

OUTPUTS = ("dicom", "fhir", "json")
GROUP_KINDS = ("ORDER", "OBSERVATION")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SettingsModel(_Strict):
    timezone: StrictStr | None = None
    study_uid_policy: Literal["accession_based", "generate", "reject"] = "accession_based"
    uid_root: StrictStr | None = None
    coding_scheme: StrictStr = "L"
    local_code_system: StrictStr = ""
    keep_empty: StrictBool | None = None  # unset: keep "" targets except for fhir outputs
    empty_groups: Literal["error", "skip"] = "error"

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r} (use an IANA name like Europe/Berlin)") from None
        return value

    @field_validator("uid_root")
    @classmethod
    def _root(cls, value: str | None) -> str | None:
        if value is not None and (not valid_uid(value) or len(value) > 40):
            raise ValueError("uid_root must be a UID root (digits and dots, at most 40 characters)")
        return value


class ExpectedError(_Strict):
    code: int | None = None
    location: StrictStr | None = None
    text: StrictStr | None = None


class ExpectedWarning(_Strict):
    code: int | None = None
    location: StrictStr | None = None
    target: StrictStr | None = None
    text: StrictStr | None = None


class ExampleModel(_Strict):
    message: StrictStr = Field(min_length=1)  # inline ER7 or a file like samples/hl7/x.hl7
    expect: Any = None
    error: ExpectedError | None = None
    warnings: list[ExpectedWarning] = []  # each must be among the warnings the mapping gives
    description: StrictStr = ""

    @model_validator(mode="after")
    def _outcome(self) -> ExampleModel:
        if "expect" not in self.model_fields_set and self.error is None:
            raise ValueError("example needs expect: (outputs) or error: (expected refusal)")
        return self


class MappingFile(_Strict):
    name: StrictStr | None = Field(default=None, min_length=1)
    description: StrictStr = ""
    input: StrictStr  # checked against the registered input adapters by the loader
    output: Literal["dicom", "fhir", "json"]
    for_each: Literal["ORDER", "OBSERVATION"] | None = None
    when: StrictStr | None = None
    settings: dict[str, Any] | None = None  # SettingsModel, checked on its own
    fields: Any  # checked by the compiler
    examples: list[Any] = []  # ExampleModel each, checked on their own


def check(doc: YamlDocument, model: type[BaseModel], at: tuple[Any, ...] = ()) -> tuple[Any, list[Problem]]:
    """Validate the node at `at` into `model`; every error as a located problem, unknown keys
    with the nearest known one."""
    node: Any = doc.data
    for part in at:
        node = node[part]
    try:
        return model.model_validate(_plain(node)), []
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            rel = tuple(err["loc"])
            loc = at + rel
            if err["type"] == "extra_forbidden":
                known = known_keys(model, rel[:-1])
                near = difflib.get_close_matches(str(rel[-1]), known, n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                msg = f"unknown key{hint}; known: {', '.join(known)}"
            elif err["type"] == "missing":
                msg = "required key is missing"
            else:
                msg = err["msg"].removeprefix("Value error, ")
            problems.append(doc.problem(loc, msg))
        return None, problems


def known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the model takes at `loc` (a path of field names and list indexes)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return []
        current = _model_of(current.model_fields[part].annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_of(annotation: Any) -> Any:
    """list[X] / X | None -> X."""
    while get_origin(annotation) in (list, Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return None
        annotation = args[0]
    return annotation


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node
