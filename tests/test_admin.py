"""The admin endpoint's HTTP server (snocat_anyio._admin) over real loopback TCP, on
asyncio and trio: authentication, routes, methods, and its bounds against clients
that send too much, too many, too slowly or nothing at all.  Responses are read with
h11's client side.  No assertion is about how long anything took."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import h11
import pytest

from snocat_anyio._admin import AdminLimits, AdminServer, Response, bearer_token

pytestmark = pytest.mark.anyio

TOKEN = b"admin-token-0123456789abcdef"
#: Generous: a bound on waiting for what must happen, never a claim about speed.
PATIENCE = 20


def hello(request: h11.Request) -> Response:
    return Response(200, b"hello\n")


@asynccontextmanager
async def admin_server(
    *, token: bytes | None = TOKEN, limits: AdminLimits | None = None
) -> AsyncIterator[tuple[AdminServer, int]]:
    server = AdminServer({"/hello": hello}, token=token, limits=limits)
    async with anyio.create_task_group() as tg:
        _, port = await tg.start(server.serve, "127.0.0.1", 0)
        yield server, port
        tg.cancel_scope.cancel()


class Answer:
    def __init__(self, response: h11.Response, body: bytes) -> None:
        self.status = response.status_code
        self.headers = {bytes(k).decode(): bytes(v).decode() for k, v in response.headers}
        self.body = body


async def read_answer(stream: anyio.abc.ByteStream, conn: h11.Connection) -> Answer:
    response: h11.Response | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                conn.receive_data(await stream.receive())
            except anyio.EndOfStream:
                conn.receive_data(b"")
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return Answer(response, body)
        else:
            raise AssertionError(f"unexpected {event!r}")


async def get(
    port: int, path: str = "/hello", *, token: bytes | None = TOKEN, method: str = "GET"
) -> Answer:
    headers = [("host", "localhost")]
    if token is not None:
        headers.append(("authorization", "Bearer " + token.decode()))
    with anyio.fail_after(PATIENCE):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            conn = h11.Connection(h11.CLIENT)
            await stream.send(conn.send(h11.Request(method=method, target=path, headers=headers)))
            await stream.send(conn.send(h11.EndOfMessage()))
            return await read_answer(stream, conn)


async def raw(port: int, data: bytes, *, method: str = "GET") -> Answer:
    """Send ``data`` as it is and read the answer."""
    with anyio.fail_after(PATIENCE):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(data)
            conn = h11.Connection(h11.CLIENT)
            # h11 must know a request went out to read the answer to it.
            conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
            return await read_answer(stream, conn)


async def closed_by_server(stream: anyio.abc.ByteStream) -> bool:
    """Read until the server ends the connection."""
    with anyio.fail_after(PATIENCE):
        while True:
            try:
                await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True


async def test_a_request_needs_the_bearer_token() -> None:
    async with admin_server() as (_, port):
        missing = await get(port, token=None)
        assert missing.status == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert "invalid_token" not in missing.headers["www-authenticate"]
        wrong = await get(port, token=b"admin-token-0123456789abcdeX")
        assert wrong.status == 401 and "invalid_token" in wrong.headers["www-authenticate"]
        # Not even whether a path exists is told without it.
        assert (await get(port, "/nothing", token=None)).status == 401
        ok = await get(port)
        assert (ok.status, ok.body) == (200, b"hello\n")
        assert ok.headers["content-type"].startswith("text/plain")
        assert ok.headers["cache-control"] == "no-store"


async def test_without_a_token_every_request_is_served() -> None:
    async with admin_server(token=None) as (_, port):
        assert (await get(port, token=None)).status == 200
        assert (await get(port, token=b"anything-at-all-here")).status == 200


async def test_other_paths_and_methods() -> None:
    async with admin_server() as (_, port):
        assert (await get(port, "/nothing")).status == 404
        assert (await get(port, "/hello?x=1")).status == 200  # a query is ignored
        post = await get(port, method="POST")
        assert post.status == 405 and post.headers["allow"] == "GET, HEAD"
        head = await get(port, method="HEAD")
        assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "6")


async def test_one_connection_carries_several_requests() -> None:
    async with admin_server() as (_, port), await anyio.connect_tcp("127.0.0.1", port) as stream:
        conn = h11.Connection(h11.CLIENT)
        headers = [("host", "x"), ("authorization", "Bearer " + TOKEN.decode())]
        for _ in range(3):
            await stream.send(
                conn.send(h11.Request(method="GET", target="/hello", headers=headers))
            )
            await stream.send(conn.send(h11.EndOfMessage()))
            with anyio.fail_after(PATIENCE):
                answer = await read_answer(stream, conn)
            assert answer.status == 200
            conn.start_next_cycle()


async def test_oversized_heads_too_many_headers_and_bodies_are_refused() -> None:
    limits = AdminLimits(max_request_size=1024, max_headers=8)
    async with admin_server(limits=limits) as (_, port):
        long_header = b"GET /hello HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 4096 + b"\r\n\r\n"
        answer = await raw(port, long_header)
        assert answer.status == 431 and answer.headers["connection"] == "close"
        many = b"".join(b"x-%d: 1\r\n" % number for number in range(9))
        assert (
            await raw(port, b"GET /hello HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n")
        ).status == 431
        long_target = b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nhost: x\r\n\r\n"
        assert (await raw(port, long_target)).status == 431
        body = b"POST /hello HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello"
        assert (await raw(port, body, method="POST")).status == 413
        chunked = b"GET /hello HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        assert (await raw(port, chunked)).status == 413
        assert (await raw(port, b"NOT HTTP AT ALL\r\n\r\n")).status == 400
        # And the endpoint still serves.
        assert (await get(port)).status == 200


async def test_a_slowloris_does_not_block_a_scrape_and_is_cut_off() -> None:
    limits = AdminLimits(request_timeout=1.0)
    async with admin_server(limits=limits) as (server, port):
        async with await anyio.connect_tcp("127.0.0.1", port) as slow:
            # A request that never ends, trickled one byte at a time at first.
            for byte in b"GET /hello HTTP/1.1\r\nhost":
                await slow.send(bytes([byte]))
            # Meanwhile others are served as usual.
            assert (await get(port)).status == 200
            assert (await get(port)).status == 200
            # It is closed once its time is up, however little it keeps sending.
            assert await closed_by_server(slow)
        # A connection that says nothing at all is closed too.
        async with await anyio.connect_tcp("127.0.0.1", port) as silent:
            assert await closed_by_server(silent)
        with anyio.fail_after(PATIENCE):
            while server.connections:
                await anyio.sleep(0.01)


async def test_connections_beyond_the_cap_get_503_and_the_others_go_on() -> None:
    limits = AdminLimits(max_connections=2)
    async with (
        admin_server(limits=limits) as (server, port),
        await anyio.connect_tcp("127.0.0.1", port) as first,
        await anyio.connect_tcp("127.0.0.1", port) as second,
    ):
        with anyio.fail_after(PATIENCE):
            while server.connections < 2:
                await anyio.sleep(0.01)
        refused = await get(port)
        assert refused.status == 503 and refused.headers["connection"] == "close"
        await first.aclose()
        with anyio.fail_after(PATIENCE):
            while server.connections > 1:
                await anyio.sleep(0.01)
        assert (await get(port)).status == 200
        await second.aclose()


async def test_a_handler_that_raises_costs_its_connection_only() -> None:
    def broken(request: h11.Request) -> Response:
        raise RuntimeError("bug")

    server = AdminServer({"/hello": hello, "/broken": broken}, token=None)
    async with anyio.create_task_group() as tg:
        _, port = await tg.start(server.serve, "127.0.0.1", 0)
        answer = await raw(port, b"GET /broken HTTP/1.1\r\nhost: x\r\n\r\n")
        assert answer.status == 500 and answer.headers["connection"] == "close"
        assert (await get(port, token=None)).status == 200
        tg.cancel_scope.cancel()


def test_bearer_token_parsing() -> None:
    assert bearer_token(b"Bearer abc") == b"abc"
    assert bearer_token(b"bearer   abc  ") == b"abc"
    assert bearer_token(b"Basic abc") is None
    assert bearer_token(b"Bearer") is None
    assert bearer_token(b"Bearer ") is None
    assert bearer_token(None) is None
