"""A small MLLP load generator shared by the benchmarks: N connections, one message in flight each."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

VT, FS_CR = b"\x0b", b"\x1c\x0d"


@dataclass
class LoadResult:
    sent: int
    seconds: float
    latencies: list[float]
    codes: dict[str, int]

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else 0.0


async def _one_connection(host: str, port: int, bodies: list[bytes], latencies: list[float],
                          codes: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for body in bodies:
            t0 = time.perf_counter()
            writer.write(VT + body + FS_CR)
            reply = await reader.readuntil(FS_CR)
            latencies.append(time.perf_counter() - t0)
            i = reply.find(b"MSA|")
            code = reply[i + 4:i + 6].decode() if i >= 0 else "??"
            codes[code] = codes.get(code, 0) + 1
    finally:
        writer.close()


async def run_load(host: str, port: int, bodies: list[bytes], connections: int) -> LoadResult:
    chunks = [bodies[i::connections] for i in range(connections)]
    latencies: list[float] = []
    codes: dict[str, int] = {}
    t0 = time.perf_counter()
    await asyncio.gather(*(_one_connection(host, port, c, latencies, codes) for c in chunks))
    return LoadResult(len(bodies), time.perf_counter() - t0, latencies, codes)


def orm(control_id: str, accession: str, patient: str = "PAT001") -> bytes:
    segments = [
        f"MSH|^~\\&|RIS|HOSP|ENGINE|HOSP|20261125093000||ORM^O01|{control_id}|P|2.3.1||||||8859/1",
        f"PID|1||{patient}^^^HOSP^MR||DOE^JANE^Q||19700101|F|||1 MAIN ST^^CITY^ST^12345",
        "PV1|1|O|RAD^101^1||||1234^REFERRING^RITA|||||||||||V123456",
        f"ORC|NW|P{control_id}|F{control_id}||SC||^^^20261126100000^^R||20261125093000|||1234^ORDERING^OSCAR",
        f"OBR|1|P{control_id}|F{control_id}|CTHEAD^CT HEAD W/O CONTRAST^L|||20261125093000|||||||||"
        f"1234^ORDERING^OSCAR||{accession}|RP{accession}|SPS{accession}||||CT|||^^^20261126100000^^R||||"
        "HEADACHE|||5678^RADIOLOGIST^RAY",
    ]
    return "\r".join(segments).encode("latin-1") + b"\r"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open")


def rss_mb(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
