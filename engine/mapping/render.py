"""A readable dump of mapping outputs (`engine map`): DICOM as pydicom prints it, else JSON."""

from __future__ import annotations

import json
from typing import Any

from engine.errors import ProcessingWarning
from engine.mapping.dicom_out import to_dataset


def render_warnings(warnings: list[ProcessingWarning]) -> str:
    """One line per dropped or cut value: code, location, target, why and the rule's line."""
    return "\n".join(f"warning {w.code} at {w.location or '?'} ({w.target}): {w.text} [{w.source}]" for w in warnings)


def render(outputs: list[Any], output_kind: str) -> str:
    """One block per output; for dicom, non-DICOM parts (control) are shown as JSON above the dataset."""
    if output_kind != "dicom":
        return json.dumps(outputs, indent=2, ensure_ascii=False)
    blocks = []
    for i, out in enumerate(outputs, 1):
        lines = [f"--- output {i} of {len(outputs)} ---"]
        if isinstance(out, dict) and "dataset" in out:
            for key, value in out.items():
                if key != "dataset":
                    lines.append(f"{key}: {json.dumps(value, ensure_ascii=False)}")
            lines.append(str(to_dataset(out["dataset"])))
        else:
            lines.append(str(to_dataset(out)))
        blocks.append("\n".join(lines))
    return "\n".join(blocks) if blocks else "(no output)"
