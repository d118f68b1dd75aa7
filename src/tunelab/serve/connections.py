"""Limits on connections, below the ASGI app (RELIABILITY.md S17).

`guarded_protocol(settings, count)` is uvicorn's httptools protocol with what it lacks against slow and
hostile clients:
- request line + headers over `max_header_bytes`, or more than `max_headers` lines: 431. Raw bytes are
  counted as they arrive, so one endless header is refused before the parser has buffered it whole; a body
  (chunk framing and trailers included) may take `2 × max_body_bytes + max_header_bytes` raw bytes, beyond: 413;
- a timer runs whenever the server waits on the client: `header_timeout_s` for a request's line and headers
  (from connecting, from the end of the previous response, or from the first byte of a request), and
  `body_timeout_s` for its body (from the end of its headers). Past it: 408 (or, on an idle keep-alive
  connection, a silent close) — a client cannot hold a connection open by trickling bytes or blank lines.
  While a response is being produced no timer runs: the client may wait for it as long as it takes;
- more than `max_connections` open connections: the new one gets 503 at once.
Every refusal is one JSON error envelope with `Connection: close`, counted in
`tunelab_rejections_total{reason}`; the connection is then closed after a short linger (what the client still
sends is read and dropped, so the close does not become a reset that destroys the answer). A refusal never
writes into another request's response (HTTP pipelining): those are cut off instead.
"""

from __future__ import annotations

import http
import json
from typing import Callable

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tunelab.serve.protocol import APIError

LINGER_S = 2.0  # after a refused request
CAP_LINGER_S = 0.25  # after refusing a connection over the cap (it has sent little or nothing yet)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that is refused."""


def refusal_bytes(err: APIError) -> bytes:
    """A whole HTTP/1.1 response for `err` (its JSON envelope, `connection: close`, its headers), written
    straight to the transport, outside uvicorn's request cycle."""
    body = json.dumps(err.body()).encode()
    head = [f"HTTP/1.1 {err.status} {http.HTTPStatus(err.status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    head += [f"{k.lower()}: {v}" for k, v in err.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def guarded_protocol(settings, count: Callable[[str], None] = lambda reason: None) -> type:
    """An `asyncio.Protocol` class for `uvicorn.Config(http=...)` enforcing the limits in `settings`
    (a `ServeConfig`); `count(reason)` is called once per refused connection or request."""
    body_raw_limit = 2 * settings.max_body_bytes + settings.max_header_bytes

    # Longer than 60 lines because it is a class, defined here because uvicorn builds one protocol object per
    # connection from a class it is given: the limits reach it only by closure. Its methods are each short.
    class GuardedProtocol(HttpToolsProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._phase = "idle"  # of parsing: idle (between requests) | headers | body
            self._raw = 0  # raw bytes received in this phase (headers or body)
            self._parsed_bytes = self._header_lines = 0  # of this request's headers, as parsed
            self._served = 0  # responses completed on this connection
            self._cycles: list = []  # request cycles whose response is not complete (pipelining: several)
            self._timer = None
            self._timer_kind: str | None = None
            self._refusal: tuple[APIError, str] | None = None

        # ---- connection --------------------------------------------------------------------------
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > settings.max_connections:  # uvicorn has added this connection already
                self._refuse(APIError(503, "the server has too many open connections; retry shortly",
                                      type="server_error", code="too_many_connections",
                                      headers={"Retry-After": "1"}), "connections", linger=CAP_LINGER_S)
                return
            self._rearm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refusal is not None:  # refused: drop what is still sent while lingering
                return
            if self._phase != "idle":
                self._raw += len(data)
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
                    # a callback refused the request (_Refused surfaces as HttpParserCallbackError); it was
                    # counted there, so no reason here
                    err, _ = self._refusal
                    self._refusal = None
                    self._refuse(err, None)
                return
            if self._refusal is not None:
                return
            if self._phase == "headers" and self._raw > settings.max_header_bytes:
                self._refuse(self._header_error(), "headers_too_large")
            elif self._phase == "body" and self._raw > body_raw_limit:
                self._refuse(APIError(413, f"the request body is over the limit of {settings.max_body_bytes} "
                                      "bytes", code="request_too_large"), "body_too_large")

        # ---- parser callbacks --------------------------------------------------------------------
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._phase, self._parsed_bytes, self._header_lines = "headers", 0, 0
            self._rearm(restart="header")  # a new request has its own time for its headers

        def on_url(self, url: bytes) -> None:
            self._header_bytes_seen(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_lines += 1
            self._header_bytes_seen(len(name) + len(value) + 4)  # + ": " and CRLF
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._phase, self._raw = "body", 0
            super().on_headers_complete()
            self._cycles = [c for c in self._cycles if not c.response_complete]
            if self.cycle is not None and self.cycle not in self._cycles:
                self._cycles.append(self.cycle)
            self._rearm()

        def on_message_complete(self) -> None:
            self._phase, self._raw = "idle", 0
            super().on_message_complete()
            self._rearm()

        def on_response_complete(self) -> None:
            self._served += 1
            super().on_response_complete()
            self._cycles = [c for c in self._cycles if not c.response_complete]
            self._rearm()

        # ---- timers ------------------------------------------------------------------------------
        def _rearm(self, restart: str | None = None) -> None:
            """Run the timer this moment calls for: none while a response is being produced (unless its own
            body is still due), else the body timer during a body, else the header timer."""
            if self._refusal is not None or self.transport is None or self.transport.is_closing():
                return self._disarm()
            busy = any(not c.response_complete for c in self._cycles)
            if self.pipeline:  # an earlier response is still being produced; reading is paused meanwhile
                kind = None
            elif self._phase == "body":
                kind = "body"
            elif busy:
                kind = None
            else:
                kind = "header"
            if kind is None:
                return self._disarm()
            if kind != self._timer_kind or restart == kind:
                self._disarm()
                seconds = settings.body_timeout_s if kind == "body" else settings.header_timeout_s
                self._timer, self._timer_kind = self.loop.call_later(seconds, self._expired, kind), kind

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._timer_kind = None

        def _expired(self, kind: str) -> None:
            self._timer = self._timer_kind = None
            if self._refusal is not None or self.transport.is_closing():
                return
            if kind == "header" and self._phase == "idle" and self._served:
                self._refusal = (APIError(408, "idle"), "")
                self.transport.close()  # an idle keep-alive connection: closed quietly, as uvicorn does
            elif kind == "header":
                self._refuse(APIError(408, f"the request headers took longer than {settings.header_timeout_s:g} s",
                                      code="request_timeout"), "header_timeout")
            else:
                self._refuse(APIError(408, f"the request body took longer than {settings.body_timeout_s:g} s",
                                      code="request_timeout"), "body_timeout")

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

        def _refuse(self, err: APIError, reason: str | None, linger: float = LINGER_S) -> None:
            """Answer `err` and close the connection (after lingering). If a response is already under way on
            this connection, nothing is written into it: it is cut off."""
            if reason is not None:
                count(reason)
            self._disarm()
            self._refusal = self._refusal or (err, reason or "")
            transport = self.transport
            if transport.is_closing():
                return
            answering = any(c.response_started and not c.response_complete for c in self._cycles)
            # the request being read (not a new one's headers) was answered already: no second answer to it
            answered = self._phase != "headers" and self.cycle is not None and self.cycle.response_started
            for c in self._cycles:  # the app sees a disconnect; its writes are dropped
                if not c.response_complete:
                    c.disconnected = True
                    c.message_event.set()
            if answering or answered or self.pipeline:
                transport.close()
                return
            transport.write(refusal_bytes(err))
            if transport.can_write_eof():
                transport.write_eof()
                transport.resume_reading()  # data_received drops everything from now on
                self.loop.call_later(linger, transport.close)
            else:
                transport.close()

    return GuardedProtocol
