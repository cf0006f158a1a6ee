"""The frontend's HTTP server: aiohttp's, with bounds on what one connection may hold.

aiohttp answers a request it cannot parse (headers too large, a garbled request line) before any
route or middleware, in plain text; it keeps a connection that never finishes its headers for
an hour and accepts any number of connections. Here those errors are OpenAI error objects like
every other one, a request head must arrive within `header_timeout_s`, and connections past
`max_connections` are closed as soon as they are accepted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from faasmoe.api.openai_requests import error_body

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client connection may take from the frontend."""

    # From accept (or the end of the previous response) to a complete request head; also how long an
    # idle keep-alive connection stays open, as uvicorn's 5 s and nginx's 75 s do.
    header_timeout_s: float = 15.0
    max_connections: int = 1024
    max_line_size: int = 8190  # the request line
    max_field_size: int = 8190  # one header line


class FrontendRunner(web.AppRunner):
    """`web.AppRunner` whose connections are bounded by `limits` and whose parse errors are JSON."""

    def __init__(self, app: web.Application, limits: ConnectionLimits | None = None, **kwargs) -> None:
        self.limits = limits or ConnectionLimits()
        # aiohttp's keep-alive timer runs from the connection's start and from each response's end, and
        # closes the connection when it is still waiting for a request head: that is the header timeout.
        super().__init__(app, keepalive_timeout=self.limits.header_timeout_s,
                         max_line_size=self.limits.max_line_size, max_field_size=self.limits.max_field_size,
                         **kwargs)

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup and freezes it
        return _BoundedServer(plain, self.limits)


class _BoundedServer(web.Server):
    """aiohttp's Server (same handler, request factory and options) making `_BoundedRequestHandler`s."""

    def __init__(self, plain: web.Server, limits: ConnectionLimits) -> None:
        super().__init__(plain.request_handler, request_factory=plain.request_factory,
                         handler_cancellation=plain.handler_cancellation, **plain._kwargs)
        self.limits = limits
        self._last_refusal_log = 0.0

    def __call__(self) -> RequestHandler:
        return _BoundedRequestHandler(self, loop=self._loop, **self._kwargs)

    def refuse(self, handler: RequestHandler) -> None:
        now = time.monotonic()
        if now - self._last_refusal_log > 10.0:  # a flood must not also flood the log
            self._last_refusal_log = now
            log.warning("%d connections open (the cap is %d): closing new ones", len(self.connections) - 1,
                        self.limits.max_connections)
        handler.force_close()


class _BoundedRequestHandler(RequestHandler):
    """One connection: closed at once past the cap; parse errors rendered as OpenAI errors."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)  # registers the connection with the server
        server = self._manager
        if len(server.connections) > server.limits.max_connections:
            server.refuse(self)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response is under way: nothing to render into
            raise ConnectionError("the response has started; cannot send an error after it")
        status, kind, code, text = _classify(status, exc, message, self._manager.limits)
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.info("bad request from %s: %s", request.remote, text)
        response = web.json_response(error_body(text, kind, None, code), status=status)
        response.force_close()
        return response


def _classify(status: int, exc: BaseException | None, message: str | None,
              limits: ConnectionLimits) -> tuple[int, str, str | None, str]:
    """HTTP status, OpenAI error type, code and message of an error aiohttp met before routing."""
    if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "headers" in str(exc).lower()):
        return (431, "invalid_request_error", "request_header_fields_too_large",
                f"The request's header fields are too large: at most {limits.max_field_size} bytes a line.")
    if status >= 500:
        return status, "server_error", None, "The server had an error while processing your request."
    return status, "invalid_request_error", "bad_request", f"Malformed HTTP request: {message or exc or status}"
