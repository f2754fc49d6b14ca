"""Memory under hostile MLLP peers: N connections each holding an unfinished frame of M MB.

    python benchmarks/mllp_memory.py [--connections 32] [--mb 15] [--budget BYTES]

Prints the engine's RSS idle and while the frames are held, and whether a well-behaved sender
still gets AA. Without a budget the source's default (256 MiB for the whole process) applies.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _load import free_port, orm, rss_mb, wait_port  # noqa: E402

from engine.hl7.mllp import MLLPClient  # noqa: E402


async def run(connections: int, mb: int, budget: int | None) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder, port = Path(d), free_port()
        (folder / "channels").mkdir()
        (folder / "mappings").mkdir()
        (folder / "engine.yaml").write_text(
            f"storage:\n  url: sqlite:///{folder / 'e.db'}\ndicom:\n  enabled: false\nlog_level: ERROR\n"
        )
        extra = f", max_buffered_bytes: {budget}" if budget else ""
        (folder / "channels" / "c.yaml").write_text(
            f"name: c\nsource: {{type: mllp, port: {port}, read_timeout: 300{extra}}}\naccept: [ORM^O01]\n"
        )
        engine = subprocess.Popen(
            [sys.executable, "-m", "engine", "run", "-c", str(folder / "engine.yaml")], stdout=subprocess.DEVNULL
        )
        try:
            wait_port(port)
            idle = rss_mb(engine.pid)[0]
            writers = []
            for _ in range(connections):
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"\x0b" + orm("HOG", "A1")[:200])
                writers.append(w)
            chunk = b"x" * 2**20
            for _ in range(mb):
                for w in writers:
                    w.write(chunk)
                await asyncio.gather(*(w.drain() for w in writers))
            await asyncio.sleep(2)
            held, peak = rss_mb(engine.pid)
            async with MLLPClient("127.0.0.1", port, read_timeout=30) as client:
                ack = await client.send(orm("OK-1", "A2"))
            code = ack.split(b"MSA|")[1][:2].decode() if b"MSA|" in ack else "?"
            print(
                f"budget {budget or 'default'}: RSS idle {idle:.0f} MB; {connections} x {mb} MB unfinished frames "
                f"{held:.0f} MB (peak {peak:.0f}); a good ORM meanwhile: {code}"
            )
            for w in writers:
                w.close()
        finally:
            engine.terminate()
            engine.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--mb", type=int, default=15)
    ap.add_argument("--budget", type=int, default=None)
    args = ap.parse_args()
    asyncio.run(run(args.connections, args.mb, args.budget))


if __name__ == "__main__":
    main()
