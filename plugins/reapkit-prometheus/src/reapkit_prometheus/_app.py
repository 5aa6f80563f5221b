"""The ASGI application: prometheus-client's app at one path, the lifespan protocol answered
(prometheus-client's app does not speak it, and hypercorn would log a warning), 404 and 405
for everything else."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, make_asgi_app

Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
App = Callable[[Any, Receive, Send], Awaitable[None]]


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), *headers]
    headers.append((b"content-length", str(len(body)).encode("ascii")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def metrics_app(registry: CollectorRegistry, path: str) -> App:
    """An ASGI app serving ``registry`` at ``path`` (GET only)."""
    metrics: App = make_asgi_app(registry)

    async def app(scope: Any, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # a websocket: hypercorn closes it when the app returns without accepting
        if scope["path"] != path:
            await _respond(send, 404, f"metrics are at {path}\n".encode(), [])
        elif scope["method"] != "GET":
            await _respond(send, 405, b"GET only\n", [(b"allow", b"GET")])
        else:
            await metrics(scope, receive, send)

    return app
