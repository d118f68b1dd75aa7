"""`tunelab serve`: check the arguments, bind (loopback unless keys are set), print how to call it, run.

The address is bound before the banner: a port in use is a `UserError`, not uvicorn's log line.
SIGTERM / Ctrl-C: the server stops accepting connections and answers 503 to new requests on open ones,
lets in-flight requests finish (up to `drain_timeout_s`), then stops the engines and exits 0. A model that
fails to load stops the server and `serve` raises its `UserError` (a bug in loading: its exception).
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys

import torch
import uvicorn

from tunelab.config import ServeConfig
from tunelab.errors import UserError
from tunelab.serve.app import create_app
from tunelab.serve.auth import ENV_KEYS, is_loopback, read_keys
from tunelab.serve.connections import guarded_protocol
from tunelab.serve.registry import check_specs


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, guard, banner):
        super().__init__(config)
        self.guard, self.banner, self.load_error = guard, banner, None
        guard.state.on_load_error = self._fail

    def handle_exit(self, sig, frame) -> None:
        # as uvicorn's, except that the signal is not re-raised after the drain: a drained server exits 0
        self.guard.state.draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    def _fail(self, err: Exception) -> None:
        self.load_error = err
        self.should_exit = True

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.banner(host, port)


def _raise_open_files_limit(wanted: int) -> None:
    """Every connection is a file descriptor: lift the soft limit towards `wanted` (as far as the hard limit
    allows), so that the connection cap, not the OS, decides when to refuse."""
    try:
        import resource  # POSIX only: on Windows the ImportError below leaves the limit alone

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):  # not on this OS, or not allowed: the OS limit stays
        pass


def _listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets on every address of `host`, as uvicorn would open them (SO_REUSEADDR; IPv6 sockets
    IPv6-only, as asyncio's), all on one port (port 0: the one the OS picks for the first). A port in use, a
    privileged port or a host that is not this machine's is a `UserError`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UserError(f"cannot listen on {host}: {err.strerror}") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):  # an address listed twice is bound once
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr[0], socks[0].getsockname()[1] if len(socks) > 1 else port, *addr[2:]))
            sock.listen(backlog)
    except OSError as err:
        for sock in socks:
            sock.close()
        raise UserError(_bind_error(err, host, port)) from None
    return socks


def _bind_error(err: OSError, host: str, port: int) -> str:
    if err.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use (another server listens there); choose another --port"
    if err.errno == errno.EACCES:
        return f"port {port} on {host} needs privileges (ports below 1024 do); choose another --port"
    if err.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}: not an address of this machine (127.0.0.1 for local use, 0.0.0.0 for all)"
    return f"cannot listen on {host}:{port}: {err.strerror}"


def _model_registry(cfg: ServeConfig):
    from tunelab.registry import Registry  # SQLAlchemy: only for registry:NAME@ALIAS models

    return Registry(cfg.registry, cfg.registry_db)


def run_guarded(guard, settings, banner, lifespan: str) -> _Server:
    """Serve the app `guard` (a `Guard`) on `settings.host`/`port` with the per-connection limits of `settings` until
    SIGTERM / Ctrl-C (a drain of up to `settings.drain_timeout_s`) -> the stopped server. `banner(host, port)` is
    called once it listens."""
    _raise_open_files_limit(settings.max_connections + 256)
    rejections = guard.state.metrics.rejections
    config = uvicorn.Config(guard, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=int(settings.drain_timeout_s), lifespan=lifespan,
                            http=guarded_protocol(settings, lambda reason: rejections.labels(reason).inc()))
    sockets = _listen(settings.host, settings.port, config.backlog)
    server = _Server(config, guard, banner)
    try:
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
    return server


def serve(cfg: ServeConfig, out=print) -> int:
    """Run until SIGTERM/SIGINT; -> exit code."""
    keys = read_keys(cfg.api_keys_file)
    if not keys and not is_loopback(cfg.host):
        raise UserError(f"refusing to listen on {cfg.host} without API keys: set {ENV_KEYS} or --api-keys-file "
                        "(or bind 127.0.0.1)")
    specs = check_specs(cfg.models, cfg.embedding_model, registry=lambda: _model_registry(cfg))
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    guard = create_app(cfg, specs, keys, device)

    def banner(host: str, port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}"
        gen = next((s.id for s in specs if s.kind == "generate"), None)
        out(f"tunelab serving on {url}   (playground: {url}/ , ready when {url}/ready answers 200)")
        for s in specs:
            where = f"{s.version}, following registry:{s.follow}" if s.follow else (s.version or s.ref)
            out(f"  model {s.id:<28} {s.kind:<9} {s.engine:<12} {where}")
        for r in guard.state.registry.rag:
            out(f"  model {r.id:<28} {'generate':<9} {'knowledge':<12} {r.index}, answered by {r.model}")
        auth = '-H "Authorization: Bearer $KEY" ' if keys else ""
        rec = next((s.id for s in specs if s.kind == "recommend"), None)
        if gen or rec:
            out("try:")
        if rec:
            out(f"  curl {url}/v1/recommend {auth}-H 'Content-Type: application/json' "
                f"-d '{{\"model\": \"{rec}\", \"user\": \"USER ID\", \"k\": 10}}'")
        if gen:
            out(f"  curl {url}/v1/chat/completions {auth}-H 'Content-Type: application/json' "
                f"-d '{{\"model\": \"{gen}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'")
            key = 'os.environ["KEY"]' if keys else '"none"'
            out(f"  python -c 'import os, openai; c = openai.OpenAI(base_url=\"{url}/v1\", api_key={key}); "
                f"print(c.chat.completions.create(model=\"{gen}\", messages=[{{\"role\": \"user\", "
                f"\"content\": \"Hello!\"}}]).choices[0].message.content)'")
        sys.stdout.flush()

    # lifespan "on": it starts the model loading; "auto" would take an error in it for "lifespan unsupported" and
    # serve without models
    server = run_guarded(guard, cfg, banner, lifespan="on")
    if server.load_error is not None:
        raise server.load_error
    return 0
