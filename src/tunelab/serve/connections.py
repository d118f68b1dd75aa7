"""Limits on connections, below the ASGI app (RELIABILITY.md S17).

`guarded_protocol(settings, count)` is uvicorn's httptools protocol with what it lacks against slow and
hostile clients:
- request line + headers over `max_header_bytes`, or more than `max_headers` lines: 431, and close. Raw bytes
  are counted as they arrive, so one endless header is refused before the parser has buffered it whole;
- a client that takes longer than `header_timeout_s` to send its headers (from connecting, or from the first
  byte of a keep-alive request), or longer than `body_timeout_s` to send its body: 408, and close;
- more than `max_connections` open connections: the new one gets 503 and is closed at once.
Every refusal is one JSON error envelope with `Connection: close`, counted in
`tunelab_rejections_total{reason}`. Idle keep-alive connections are closed by uvicorn (`timeout_keep_alive`).
"""

from __future__ import annotations

import http
import json
from typing import Callable

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tunelab.serve.protocol import APIError


LINGER_S = 2.0


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that is refused."""


def refusal_bytes(err: APIError) -> bytes:
    body = json.dumps(err.body()).encode()
    head = [f"HTTP/1.1 {err.status} {http.HTTPStatus(err.status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    head += [f"{k.lower()}: {v}" for k, v in err.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def guarded_protocol(settings, count: Callable[[str], None] = lambda reason: None) -> type:
    """An `asyncio.Protocol` class for `uvicorn.Config(http=...)` enforcing the limits in `settings`
    (a `ServeConfig`); `count(reason)` is called once per refused connection or request."""

    class GuardedProtocol(HttpToolsProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._in_headers = True  # between the end of a request (or connecting) and the end of the next headers
            self._header_bytes = 0  # raw bytes received while in the headers (catches one endless header)
            self._parsed_bytes = self._header_lines = 0  # of this request, as parsed
            self._timer = None
            self._refusal: tuple[APIError, str] | None = None

        # ---- connection --------------------------------------------------------------------------
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > settings.max_connections:
                self._refuse(APIError(503, "the server has too many open connections; retry shortly",
                                      type="server_error", code="too_many_connections",
                                      headers={"Retry-After": "1"}), "connections", linger=False)
                return
            self._arm(settings.header_timeout_s, self._headers_too_slow)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refusal is not None:
                return
            if self._in_headers:
                self._header_bytes += len(data)
            # as uvicorn's, except that a request a callback refused gets its own answer (not "invalid request")
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            except httptools.HttpParserError:
                if self._refusal is None:
                    self.logger.warning("Invalid HTTP request received.")
                    self.send_400_response("Invalid HTTP request received.")
                else:
                    err, _ = self._refusal
                    self._refusal = None
                    self._refuse(err, None)
                return
            if self._in_headers and self._refusal is None and self._header_bytes > settings.max_header_bytes:
                self._too_large()

        # ---- parser callbacks --------------------------------------------------------------------
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_lines = self._parsed_bytes = 0
            if self._timer is None:
                self._arm(settings.header_timeout_s, self._headers_too_slow)

        def on_url(self, url: bytes) -> None:
            self._header_bytes_seen(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_lines += 1
            self._header_bytes_seen(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._disarm()
            super().on_headers_complete()
            self._arm(settings.body_timeout_s, self._body_too_slow)

        def on_message_complete(self) -> None:
            self._disarm()
            self._in_headers, self._header_bytes = True, 0
            super().on_message_complete()

        # ---- refusals ----------------------------------------------------------------------------
        def _header_bytes_seen(self, n: int) -> None:
            self._parsed_bytes += n
            if self._header_lines > settings.max_headers or self._parsed_bytes > settings.max_header_bytes:
                self._refusal = (self._header_error(), "headers_too_large")
                count("headers_too_large")
                raise _Refused()

        def _header_error(self) -> APIError:
            return APIError(431, f"the request headers are over the limit of {settings.max_header_bytes} bytes or "
                            f"{settings.max_headers} lines", code="headers_too_large")

        def _too_large(self) -> None:
            self._refuse(self._header_error(), "headers_too_large")

        def _headers_too_slow(self) -> None:
            self._timer = None
            if self._in_headers and not self.transport.is_closing():
                self._refuse(APIError(408, f"the request headers took longer than {settings.header_timeout_s:g} s",
                                      code="request_timeout"), "header_timeout")

        def _body_too_slow(self) -> None:
            self._timer = None
            if self.cycle is not None and not self.cycle.response_complete and self.cycle.more_body:
                self._refuse(APIError(408, f"the request body took longer than {settings.body_timeout_s:g} s",
                                      code="request_timeout"), "body_timeout")

        def _refuse(self, err: APIError, reason: str | None, linger: bool = True) -> None:
            """Answer `err` (unless a response has started) and close the connection. Lingering: the write side
            is shut at once but what the client still sends is read and dropped for `LINGER_S` before the
            close, so that unread bytes do not turn the close into a reset that could destroy the answer."""
            if reason is not None:
                count(reason)
            self._disarm()
            self._refusal = self._refusal or (err, reason or "")
            cycle = self.cycle
            started = cycle is not None and cycle.response_started and not cycle.response_complete
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the app, if it is running, sees a disconnect; its writes are dropped
                cycle.message_event.set()
            transport = self.transport
            if transport.is_closing():
                return
            if not started:
                transport.write(refusal_bytes(err))
            if linger and transport.can_write_eof():
                transport.write_eof()
                transport.resume_reading()  # data_received drops everything from now on
                self.loop.call_later(LINGER_S, transport.close)
            else:
                transport.close()

        def _arm(self, seconds: float, handler) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, handler)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    return GuardedProtocol
