"""An asyncio HTTP service that runs a reaper through reapkit.asyncio (trio guest mode).

    python asyncio_service.py POLICY [--port 8078] [--dry-run]

Same endpoints as trio_service.py: GET /kills, GET /stats, POST /trigger. SIGTERM or SIGINT
stops the service, and with it the reaper (every fd closed, every thread joined).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
from typing import Any

import attrs

import reapkit
import reapkit.asyncio


async def main(policy: reapkit.Policy, port: int) -> None:
    kills: collections.deque[dict[str, Any]] = collections.deque(maxlen=50)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async with reapkit.asyncio.open_reaper(policy, live_table=False) as reaper:

        async def keep_recent() -> None:
            async for record in reaper.records():
                kills.append(record.as_json())

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            method, path, _ = (await reader.readuntil(b"\r\n\r\n")).split(b" ", 2)
            if (method, path) == (b"GET", b"/kills"):
                status, body = "200 OK", list(kills)
            elif (method, path) == (b"GET", b"/stats"):
                status, body = "200 OK", attrs.asdict(reaper.statistics())
            elif (method, path) == (b"POST", b"/trigger"):
                await reaper.trigger("POST /trigger")
                status, body = "202 Accepted", {"triggered": True}
            else:
                status, body = (
                    "404 Not Found",
                    {"error": "try GET /kills, GET /stats, POST /trigger"},
                )
            payload = json.dumps(body, default=str).encode()
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload
            )
            await writer.drain()
            writer.close()

        recent = asyncio.create_task(keep_recent())
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        print(f"listening on port {server.sockets[0].getsockname()[1]}", flush=True)
        async with server:
            await stop.wait()
        recent.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("policy")
    parser.add_argument("--port", type=int, default=8078)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(reapkit.load_policy(args.policy, dry_run=args.dry_run), args.port))
