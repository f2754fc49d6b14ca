"""The baseline: an asyncio MLLP loop that only frames and ACKs (no parsing, no storage)."""

from __future__ import annotations

import asyncio
import sys

ACK = (b"\x0bMSH|^~\\&|ENGINE|HOSP|RIS|HOSP|20261125093000||ACK^O01^ACK|A1|P|2.3.1\rMSA|AA|%s\r\x1c\x0d")


class Bare(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\x1c\x0d")
            if end < 0:
                return
            frame = bytes(self.buf[:end])
            del self.buf[:end + 2]
            # MSH-10 is the 10th field: echo it in MSA-2 like a real receiver
            fields = frame[frame.find(b"MSH"):frame.find(b"\r")].split(b"|")
            self.transport.write(ACK % (fields[9] if len(fields) > 9 else b""))  # type: ignore[attr-defined]


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Bare, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
