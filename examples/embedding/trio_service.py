"""A small trio HTTP service that runs a reaper in its own nursery.

    python trio_service.py POLICY [--port 8077] [--dry-run]

GET /kills lists the recent KillRecords, GET /stats the reaper's statistics, POST /trigger asks
the rules to act now. Plain HTTP/1.0 on trio's sockets, to keep the example to the point.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import signal
from typing import Any

import attrs
import trio

import reapkit


async def handle(
    stream: trio.SocketStream, reaper: reapkit.Reaper, kills: collections.deque[dict[str, Any]]
) -> None:
    request = b""
    while b"\r\n\r\n" not in request and len(request) < 8192:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        request += chunk
    method, path, _ = request.split(b" ", 2)
    if (method, path) == (b"GET", b"/kills"):
        status, body = "200 OK", list(kills)
    elif (method, path) == (b"GET", b"/stats"):
        status, body = "200 OK", attrs.asdict(reaper.statistics())
    elif (method, path) == (b"POST", b"/trigger"):
        await reaper.trigger("POST /trigger")
        status, body = "202 Accepted", {"triggered": True}
    else:
        status, body = "404 Not Found", {"error": "try GET /kills, GET /stats, POST /trigger"}
    payload = json.dumps(body, default=str).encode()
    head = f"HTTP/1.0 {status}\r\nContent-Length: {len(payload)}\r\n\r\n"
    await stream.send_all(head.encode() + payload)
    await stream.aclose()


async def keep_recent(reaper: reapkit.Reaper, kills: collections.deque[dict[str, Any]]) -> None:
    async with reaper.records() as records:
        async for record in records:
            kills.append(record.as_json())


async def main(policy: reapkit.Policy, port: int) -> None:
    kills: collections.deque[dict[str, Any]] = collections.deque(maxlen=50)
    async with trio.open_nursery() as nursery:
        reaper = await nursery.start(
            functools.partial(reapkit.serve_reaper, policy, live_table=False)
        )
        nursery.start_soon(keep_recent, reaper, kills)
        handler = functools.partial(handle, reaper=reaper, kills=kills)
        listeners = await nursery.start(trio.serve_tcp, handler, port)
        print(f"listening on port {listeners[0].socket.getsockname()[1]}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break  # stop: the reaper, the listener and the records task end together
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("policy")
    parser.add_argument("--port", type=int, default=8077)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    trio.run(main, reapkit.load_policy(args.policy, dry_run=args.dry_run), args.port)
