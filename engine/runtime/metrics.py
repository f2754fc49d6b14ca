"""Prometheus text exposition (format 0.0.4) of what the store knows, read at scrape time.

Messages by channel and status, deliveries by channel, destination and state, delivery latency
(queued to done) over the most recent deliveries, the HTTP requests this process answered, and
where each poller stands. Only names, counts and times: never content.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select

from engine.store.models import Delivery, DeliveryState, Message
from engine.store.poll_state import POLL_STATE

MESSAGES = Message.__table__  # type: ignore[attr-defined]  # SQLModel adds __table__ to table classes
DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]
LATENCY_SAMPLE = 1000  # done deliveries per channel/destination the latency summary is taken over
QUANTILES = (0.5, 0.9, 0.99)


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: Any) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def _family(name: str, kind: str, text: str, samples: Iterable[tuple[str, float]]) -> list[str]:
    lines = [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {value:g}" for labels, value in samples]
    return lines


def _seconds(a: Any, b: Any) -> float:
    if isinstance(a, str):  # SQLite returns text for some dialect paths
        a, b = datetime.fromisoformat(a), datetime.fromisoformat(b)
    if a.tzinfo is None:
        a = a.replace(tzinfo=UTC)
    if b.tzinfo is None:
        b = b.replace(tzinfo=UTC)
    return max(0.0, (b - a).total_seconds())


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def render(db: Engine, http_requests: Counter[tuple[str, int]]) -> str:
    """The whole exposition; runs in a worker thread (it reads the store)."""
    with db.connect() as conn:
        messages = conn.execute(
            select(MESSAGES.c.channel, MESSAGES.c.status, func.count()).group_by(MESSAGES.c.channel, MESSAGES.c.status)
        ).all()
        queue = conn.execute(
            select(DELIVERIES.c.channel, DELIVERIES.c.destination, DELIVERIES.c.state, func.count())
            .group_by(DELIVERIES.c.channel, DELIVERIES.c.destination, DELIVERIES.c.state)
        ).all()
        pairs = {(r[0], r[1]) for r in queue}
        latencies: dict[tuple[str, str], list[float]] = {}
        for channel, destination in sorted(pairs):
            rows = conn.execute(
                select(DELIVERIES.c.created_at, DELIVERIES.c.updated_at)
                .where(DELIVERIES.c.channel == channel, DELIVERIES.c.destination == destination,
                       DELIVERIES.c.state == DeliveryState.DONE)
                .order_by(DELIVERIES.c.id.desc())
                .limit(LATENCY_SAMPLE)
            ).all()
            if rows:
                latencies[(channel, destination)] = sorted(_seconds(a, b) for a, b in rows)
        polls = conn.execute(select(POLL_STATE)).mappings().all()

    lines = _family("engine_messages_total", "counter", "Stored messages by channel and status.",
                    ((_labels(channel=c, status=s), n) for c, s, n in sorted(messages)))
    lines += _family("engine_queue_depth", "gauge", "Deliveries by channel, destination and state.",
                     ((_labels(channel=c, destination=d, state=s), n) for c, d, s, n in sorted(queue)))
    samples: list[tuple[str, float]] = []
    for (channel, destination), values in sorted(latencies.items()):
        for q in QUANTILES:
            samples.append((_labels(channel=channel, destination=destination, quantile=q), _quantile(values, q)))
    lines += _family("engine_delivery_latency_seconds", "summary",
                     f"Queued-to-done time of the last {LATENCY_SAMPLE} done deliveries.", samples)
    for (channel, destination), values in sorted(latencies.items()):
        lab = _labels(channel=channel, destination=destination)
        lines.append(f"engine_delivery_latency_seconds_sum{lab} {sum(values):g}")
        lines.append(f"engine_delivery_latency_seconds_count{lab} {len(values)}")
    lines += _family("engine_http_requests_total", "counter", "HTTP requests answered by this process.",
                     ((_labels(channel=c, code=s), n) for (c, s), n in sorted(http_requests.items())))
    lines += _family("engine_poll_last_run_timestamp_seconds", "gauge", "When each poller last ran.",
                     ((_labels(channel=p["channel"], resource=p["resource_type"]), p["last_run_at"].timestamp()
                       if p["last_run_at"].tzinfo else p["last_run_at"].replace(tzinfo=UTC).timestamp())
                      for p in polls if p["last_run_at"] is not None))
    lines += _family("engine_poll_fetched", "gauge", "Resources the last poll fetched.",
                     ((_labels(channel=p["channel"], resource=p["resource_type"]), p["fetched"]) for p in polls))
    lines += _family("engine_poll_runs_total", "counter", "Poll runs.",
                     ((_labels(channel=p["channel"], resource=p["resource_type"]), p["runs"]) for p in polls))
    lines += _family("engine_poll_failing", "gauge", "1 when the last poll run failed.",
                     ((_labels(channel=p["channel"], resource=p["resource_type"]), 1 if p["last_error"] else 0)
                      for p in polls))
    return "\n".join(lines) + "\n"
