"""Hot-path benchmark: the ER7 view and the orm-to-worklist mapping, against python-hl7 and hl7apy.

    python benchmarks/mapping.py [--messages 2000] [--repeats 20] [--hl7apy-messages 300]

On the same unique one-order ORM^O01 messages (`_load.orm`, bytes as they come off the wire),
prints in one run, as msgs/s (best of `--repeats` timed passes, since the machine is shared):

- view:          Message.parse + read PID-3.1, PID-5, OBR-18, ORC-7.4, MSH-10
- view+mapping:  Message.parse + mappings/orm-to-worklist.yaml (Mapping.run: one worklist item)
- python-hl7:    hl7.parse (of the decoded text) + the same five reads
- hl7apy:        parse_message + the same five reads, on `--hl7apy-messages` messages

and the ratios between them. All four read the same five values (checked before timing).
Targets: view > 100,000 msg/s; parse + mapping > 20,000 maps/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import orm  # noqa: E402

from engine.hl7.er7 import Message  # noqa: E402
from engine.mapping import load_mapping  # noqa: E402

PATHS = ("PID-3.1", "PID-5", "OBR-18", "ORC-7.4", "MSH-10")
VIEW_TARGET, MAP_TARGET = 100_000, 20_000


def view_reads(data: bytes) -> tuple[str, ...]:
    m = Message.parse(data)
    return m.get("PID-3.1"), m.get("PID-5"), m.get("OBR-18"), m.get("ORC-7.4"), m.get("MSH-10")


def python_hl7_reads(data: bytes) -> tuple[str, ...]:
    import hl7

    m = hl7.parse(data.decode("latin-1"))
    pid, obr, orc, msh = m.segment("PID"), m.segment("OBR"), m.segment("ORC"), m.segment("MSH")
    return str(pid(3)(1)(1)), str(pid(5)), str(obr(18)), str(orc(7)(1)(4)), str(msh(10))


def hl7apy_reads(data: bytes) -> tuple[str, ...]:
    from hl7apy.parser import parse_message

    m = parse_message(data.decode("latin-1"))
    pid, order = m.orm_o01_patient.pid, m.orm_o01_order
    obr = order.orm_o01_order_detail.orm_o01_choice.obr
    return (
        pid.pid_3.cx_1.value,
        pid.pid_5.value,
        obr.obr_18.value,
        order.orc.orc_7.tq_4.value,
        m.msh.msh_10.value,
    )


def best_rate(func: Callable[[bytes], object], bodies: list[bytes], repeats: int) -> float:
    """Messages per second of the fastest of `repeats` passes over `bodies`."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in bodies:
            func(b)
        best = min(best, time.perf_counter() - t0)
    return len(bodies) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000, help="messages per timed pass")
    ap.add_argument("--repeats", type=int, default=20, help="timed passes (the best one counts)")
    ap.add_argument("--hl7apy-messages", type=int, default=300, help="messages for hl7apy (it is slow)")
    args = ap.parse_args()

    bodies = [orm(f"C{i:07d}", f"A{i:07d}", patient=f"P{i:07d}") for i in range(args.messages)]
    mapping = load_mapping(ROOT / "mappings" / "orm-to-worklist.yaml")

    def view_map(data: bytes) -> object:
        return mapping.run(Message.parse(data))

    # the same values from every parser, and the mapping gives one item with the accession
    want = view_reads(bodies[0])
    for name, f in (("python-hl7", python_hl7_reads), ("hl7apy", hl7apy_reads)):
        got = f(bodies[0])
        if got != want:
            sys.exit(f"{name} read {got}, the view {want}")
    items = view_map(bodies[0])
    assert isinstance(items, list) and len(items) == 1 and items[0]["dataset"]["AccessionNumber"] == want[2]

    print(f"{args.messages} unique ORM^O01 (1 order, {len(bodies[0])} bytes), best of {args.repeats} passes")
    view = best_rate(view_reads, bodies, args.repeats)
    mapped = best_rate(view_map, bodies, args.repeats)
    phl7 = best_rate(python_hl7_reads, bodies, max(3, args.repeats // 4))
    apy = best_rate(hl7apy_reads, bodies[: args.hl7apy_messages], 3)

    rows = [
        ("view: parse + 5 reads", view),
        ("view: parse + orm-to-worklist mapping", mapped),
        ("python-hl7: hl7.parse + 5 reads", phl7),
        (f"hl7apy: parse_message + 5 reads ({min(args.hl7apy_messages, args.messages)} msgs)", apy),
    ]
    for label, rate in rows:
        print(f"  {label:<52} {rate:>10,.0f} msg/s  ({1e6 / rate:8.1f} us)")
    print("ratios:")
    print(f"  view / python-hl7            {view / phl7:8.1f}x")
    print(f"  view / hl7apy                {view / apy:8.1f}x")
    print(f"  view+mapping / python-hl7    {mapped / phl7:8.1f}x   (mapping included vs reads only)")
    print(f"  view+mapping / hl7apy        {mapped / apy:8.1f}x")
    print(f"  mapping cost                 {1e6 / mapped - 1e6 / view:8.1f} us per message over the view's reads")
    ok_v, ok_m = view > VIEW_TARGET, mapped > MAP_TARGET
    print(
        f"targets: view > {VIEW_TARGET:,}/s {'met' if ok_v else 'NOT met'}; "
        f"parse + mapping > {MAP_TARGET:,}/s {'met' if ok_m else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
