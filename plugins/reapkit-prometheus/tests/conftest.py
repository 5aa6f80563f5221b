"""Scraping the observer as Prometheus would: a raw HTTP/1.1 request over a trio socket (no
HTTP client dependency), the exposition text parsed by prometheus-client's own parser.

Helpers are handed out as fixtures (``http_get``, ``scrape``, ``serving``): the test modules
here are not a package, so they cannot import from this file by name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

#: Seconds any one HTTP exchange may take.
HTTP_TIMEOUT = 10.0

Response = tuple[int, dict[str, str], bytes]


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2 :]
    return out


async def _http_get(
    port: int,
    path: str,
    *,
    method: str = "GET",
    host: str = "127.0.0.1",
    accept: str = "text/plain",
) -> Response:
    """One request on a fresh connection: (status, headers, body)."""
    with trio.fail_after(HTTP_TIMEOUT):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            request = (
                f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Accept: {accept}\r\nConnection: close\r\n\r\n"
            )
            await stream.send_all(request.encode("ascii"))
            raw = b""
            while chunk := await stream.receive_some():
                raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return int(status_line.split()[1]), headers, body


class Exposition:
    """A scrape's samples: ``exposition("reapkit_kills_total", rule="r", outcome="killed")``
    is that sample's value, ``None`` when it is not exported."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


async def _scrape(port: int, path: str = "/metrics") -> Exposition:
    status, headers, body = await _http_get(port, path)
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain")
    return Exposition(body.decode("utf-8"))


@pytest.fixture
def http_get() -> Callable[..., Awaitable[Response]]:
    return _http_get


@pytest.fixture
def scrape() -> Callable[..., Awaitable[Exposition]]:
    """``await scrape(port)``: GET the metrics and parse them (status 200 asserted)."""
    return _scrape


@pytest.fixture
async def serving() -> AsyncIterator[Callable[[Any], Awaitable[Any]]]:
    """``await serving(observer)`` starts ``observer.serve`` in a nursery that is cancelled
    when the test ends (as the reaper cancels it), and returns what it started with."""
    async with trio.open_nursery() as nursery:

        async def start(observer: Any) -> Any:
            return await nursery.start(observer.serve)

        yield start
        nursery.cancel_scope.cancel()
