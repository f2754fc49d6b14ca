"""Cost of the DICOM value rules (engine.dicom.vr) on the hot path.

    python benchmarks/vr.py [--messages 2000] [--repeats 20]

On the unique one-order ORM^O01 messages of benchmarks/mapping.py, prints as items/s (best of
`--repeats` passes of process CPU time, since the machine is shared):

- parse + mapping:                 Message.parse + orm-to-worklist (what benchmarks/mapping.py times)
- parse + mapping + check_output:  the same, each output checked at the output boundary
- check_output, clean item:        the checker alone on the mapped (valid) outputs
- check_output, nasty item:        the checker alone on an item where every value needs a repair

A clean item takes the fast path (one compiled test per value, no copy), so the check costs a
few microseconds per message against ~200 us for parse + mapping.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import orm  # noqa: E402

from engine.errors import ProcessingWarning  # noqa: E402
from engine.hl7.er7 import Message  # noqa: E402
from engine.mapping import load_mapping  # noqa: E402
from engine.mapping.dicom_out import check_output  # noqa: E402

SPS = "ScheduledProcedureStepSequence"
REQUIRED = ("PatientID", "PatientName", "RequestedProcedureID", f"{SPS}.Modality",
            f"{SPS}.ScheduledProcedureStepStartDate", f"{SPS}.ScheduledProcedureStepID")


def best_rate(func: Callable[[Any], object], inputs: list[Any], repeats: int) -> float:
    """Calls per second of CPU time (process time: other engineers' jobs share the cores)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for x in inputs:
            func(x)
        best = min(best, time.process_time() - t0)
    return len(inputs) / best


def nasty(output: dict[str, Any]) -> dict[str, Any]:
    """The same output with a broken value in most fields (each needs a cut, a drop or a repair)."""
    bad = copy.deepcopy(output)
    ds = bad["dataset"]
    ds["PatientName"] = "X" * 70 + "^Y"
    ds["PatientSex"] = "f"
    ds["PatientBirthDate"] = "19800230"
    ds["AdmissionID"] = "A" * 70
    ds["RequestedProcedureDescription"] = "CT\r\nHead\\Neck " + "ü" * 60
    ds["StudyInstanceUID"] = "1.2.03." + "4" * 70
    step = ds[SPS][0]
    step["Modality"] = "ct"
    step["ScheduledStationAETitle"] = "A" * 20
    step["ScheduledProcedureStepStartTime"] = "25:00"
    step["ScheduledProcedureStepDescription"] = "x" * 70
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000, help="messages per timed pass")
    ap.add_argument("--repeats", type=int, default=20, help="timed passes (the best one counts)")
    args = ap.parse_args()

    bodies = [orm(f"C{i:07d}", f"A{i:07d}", patient=f"P{i:07d}") for i in range(args.messages)]
    mapping = load_mapping(ROOT / "mappings" / "orm-to-worklist.yaml")
    outputs = [o for b in bodies for o in mapping.run(Message.parse(b))]
    sink: list[ProcessingWarning] = []

    def mapped(data: bytes) -> object:
        return mapping.run(Message.parse(data))

    def mapped_checked(data: bytes) -> object:
        return [check_output(o, required=REQUIRED, warnings=sink) for o in mapping.run(Message.parse(data))]

    def check(output: dict[str, Any]) -> object:
        return check_output(output, required=REQUIRED, warnings=sink)

    assert check(outputs[0]) is outputs[0] and not sink, "the shipped mapping's output should be clean"
    bad = [nasty(o) for o in outputs[: max(1, args.messages // 4)]]
    check(bad[0])
    per_nasty = len(sink)
    sink.clear()

    base = best_rate(mapped, bodies, args.repeats)
    with_check = best_rate(mapped_checked, bodies, args.repeats)
    clean = best_rate(check, outputs, args.repeats)
    def check_nasty(output: dict[str, Any]) -> object:
        sink.clear()
        return check(output)

    broken = best_rate(check_nasty, bad, args.repeats)

    print(f"{args.messages} unique ORM^O01, best of {args.repeats} passes")
    for label, rate in (
        ("parse + mapping", base),
        ("parse + mapping + check_output", with_check),
        ("check_output, clean item", clean),
        (f"check_output, nasty item ({per_nasty} warnings)", broken),
    ):
        print(f"  {label:<44} {rate:>10,.0f} items/s  ({1e6 / rate:8.1f} us)")
    print(f"check cost on the hot path: {1e6 / with_check - 1e6 / base:6.1f} us per message "
          f"({(base / with_check - 1) * 100:4.1f} % of parse + mapping)")


if __name__ == "__main__":
    main()
