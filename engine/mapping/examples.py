"""Running the `examples:` kept inside a mapping (what `engine map --check` reports).

An example is `{message, expect}` or `{message, error}`:
- message: inline ER7 (a YAML block, one segment per line) or a file path, looked up next to the
  mapping, then in the repository above it, then in the working directory;
- expect: a list checks every output in order (same count); a dict checks the first output.
  Both are subsets: keys not written are not checked. Unquoted numbers match digit strings;
- error: the mapping must refuse the message with these fields (code, location, text contained);
- warnings: each listed warning ({code, location, target, text contained}) must be among those the
  mapping gave (dropped or cut optional values); the message still maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.errors import ProcessingError, ProcessingWarning
from engine.mapping.loader import Example, Mapping


def map_message(mapping: Mapping, message: Any) -> tuple[list[Any], list[ProcessingWarning]]:
    """The outputs and the warnings of one message (what `engine map` shows)."""
    warnings: list[ProcessingWarning] = []
    return mapping.run(message, warnings), warnings


def example_message(mapping: Mapping, example: Example) -> Any:
    from engine.hl7.er7 import Message

    text = example.message
    if text.lstrip().startswith("MSH") or "\n" in text.strip() or "\r" in text:
        return Message.parse(text.strip("\n"))
    file = resolve_sample(mapping.path, text.strip())
    if file is None:
        raise FileNotFoundError(f"sample file {text.strip()} not found")
    return Message.parse(file.read_bytes())


def resolve_sample(mapping_path: Path, name: str) -> Path | None:
    p = Path(name)
    if p.is_absolute():
        return p if p.is_file() else None
    for base in (mapping_path.parent, mapping_path.parent.parent, Path.cwd()):
        if (base / p).is_file():
            return base / p
    return None


def check_examples(mapping: Mapping) -> list[str]:
    """Every failing example as 'file:line:col examples.N: example N+1: what differs' ([] = all
    pass): the one problem format of `engine check`, with the example counted as analysts do."""
    failures: list[str] = []
    for ex in mapping.examples:
        where = f"{mapping.display}:{ex.line}:{ex.column} examples.{ex.number - 1}: example {ex.number}"
        try:
            msg = example_message(mapping, ex)
        except (OSError, ProcessingError) as exc:
            failures.append(f"{where}: cannot read the message: {exc}")
            continue
        try:
            outputs, warnings = map_message(mapping, msg)
        except ProcessingError as exc:
            if ex.error is None:
                failures.append(f"{where}: mapping refused the message: {exc} (code {exc.code})")
            else:
                failures.extend(f"{where}: {d}" for d in _error_diffs(ex.error, exc))
            continue
        if ex.error is not None:
            failures.append(f"{where}: expected a refusal ({ex.error}), got {len(outputs)} output(s)")
            continue
        failures.extend(f"{where}: {d}" for d in expect_diffs(ex.expect, outputs))
        failures.extend(f"{where}: {d}" for d in _warning_diffs(ex.warnings, warnings))
    return failures


def _warning_diffs(expected: list[dict[str, Any]], got: list[ProcessingWarning]) -> list[str]:
    out = []
    for want in expected:
        if not any(_warning_matches(want, w) for w in got):
            seen = "; ".join(f"{w.code} at {w.location} ({w.target})" for w in got) or "none"
            out.append(f"expected a warning {want}, got {seen}")
    return out


def _warning_matches(want: dict[str, Any], w: ProcessingWarning) -> bool:
    for key in ("code", "location", "target"):
        if key in want and str(want[key]) != str(getattr(w, key)):
            return False
    return "text" not in want or str(want["text"]) in w.text


def _error_diffs(expected: dict[str, Any], exc: ProcessingError) -> list[str]:
    out = []
    if "code" in expected and str(expected["code"]) != str(exc.code):
        out.append(f"error code: expected {expected['code']}, got {exc.code} ({exc})")
    if "location" in expected and str(expected["location"]) != exc.location:
        out.append(f"error location: expected {expected['location']}, got {exc.location or '(none)'}")
    if "text" in expected and str(expected["text"]) not in exc.text:
        out.append(f"error text: expected it to contain {expected['text']!r}, got {exc.text!r}")
    return out


def expect_diffs(expect: Any, outputs: list[Any]) -> list[str]:
    if isinstance(expect, list):
        if len(expect) != len(outputs):
            return [f"expected {len(expect)} output(s), got {len(outputs)}"]
        diffs: list[str] = []
        for i, (e, o) in enumerate(zip(expect, outputs, strict=True)):
            diffs += subset_diffs(e, o, f"output[{i}]")
        return diffs
    if not outputs:
        return ["expected an output, got none"]
    return subset_diffs(expect, outputs[0], "output[0]")


def _same(expected: Any, actual: Any) -> bool:
    if expected == actual:
        return True
    if expected is None:
        return actual in ("", None, [])
    if isinstance(actual, str) and not isinstance(expected, bool):
        if isinstance(expected, int) and actual.isdigit():
            return int(actual) == expected
        return str(expected) == actual
    return False


def subset_diffs(expected: Any, actual: Any, at: str) -> list[str]:
    """What in `expected` is not in `actual` (dicts: written keys only; lists: same length)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{at}: expected a mapping, got {actual!r}"]
        out: list[str] = []
        for k, v in expected.items():
            if k not in actual:
                if v not in (None, "", []):
                    out.append(f"{at}.{k}: missing (expected {v!r})")
                continue
            out += subset_diffs(v, actual[k], f"{at}.{k}")
        return out
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{at}: expected a list, got {actual!r}"]
        if len(expected) != len(actual):
            return [f"{at}: expected {len(expected)} item(s), got {len(actual)}"]
        out = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            out += subset_diffs(e, a, f"{at}[{i}]")
        return out
    if not _same(expected, actual):
        return [f"{at}: expected {expected!r}, got {actual!r}"]
    return []
