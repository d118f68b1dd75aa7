"""API keys and per-key rate limits.

Keys come from a file (one per line, `#` comments) and/or `TUNELAB_API_KEYS` (comma-separated). Only
their SHA-256 digests are kept; a presented key is hashed and compared against every digest with
`hmac.compare_digest` (no early exit), so timing reveals neither which key nor how much of it matched.
A key is identified in metrics and rate limits by a short digest prefix, never by its text.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import threading
import time
from pathlib import Path

from tunelab.errors import UserError

ENV_KEYS = "TUNELAB_API_KEYS"
ADMIN_ENV_KEYS = "TUNELAB_ADMIN_KEYS"


def read_keys(path: Path | None, env: str = ENV_KEYS, what: str = "API keys") -> list[str]:
    """The keys of the variable `env` (comma-separated) and of the file `path` (one per line; blank and `#` lines
    skipped); [] when there are none. `UserError` when the file cannot be read, when a file is given but no key
    is found, or when any key is shorter than 16 characters."""
    keys = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read the {what} file {path}: {err.__class__.__name__}") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not keys:
            raise UserError(f"the {what} file {path} holds no keys")
    short = [k for k in keys if len(k) < 16]
    if short:
        raise UserError(f"{len(short)} {what[:-1]}(s) are shorter than 16 characters; use long random keys "
                        "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return keys


def is_loopback(host: str) -> bool:
    """`localhost`, a `*.localhost` name (RFC 6761: always loopback) or a loopback address."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_host(value: str) -> bool:
    """A Host header (`name`, `name:port`, `[v6]`, `[v6]:port`) that names this machine's loopback."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        return bool(sep) and (not rest or (rest.startswith(":") and rest[1:].isdigit())) and is_loopback(host)
    host, _, port = value.partition(":")
    return (not port or port.isdigit()) and is_loopback(host)


class KeyRing:
    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        """True when the server has keys, i.e. requests must present one."""
        return bool(self._digests)

    def identify(self, authorization: str | None) -> str | None:
        """`Authorization: Bearer KEY` -> a key id, or None when missing or wrong."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        presented = hashlib.sha256(authorization[7:].strip().encode()).digest()
        found = None
        for d in self._digests:  # no break: every digest is compared, so the time does not tell which matched
            if hmac.compare_digest(d, presented):
                found = d
        return found.hex()[:12] if found is not None else None


class RateLimiter:
    """Token bucket per key: `per_minute` requests on average, bursts up to `per_minute / 6` (10 s worth,
    at least 1). `take(key)` -> 0 when allowed, else the seconds to wait before retrying."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.burst = max(1.0, per_minute / 6)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> int:
        """Spend one request from `key`'s bucket (a new key starts with a full one). -> 0 when allowed, else
        the whole seconds (at least 1) to wait; always 0 with a rate of 0 (no limit). Thread-safe."""
        if self.rate <= 0:
            return 0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0
            self._buckets[key] = (tokens, now)
            return max(1, math.ceil((1 - tokens) / self.rate))


class Admission:
    """The key and rate-limit checks of a server's state, which holds `keys` (a `KeyRing`), `limiter` (a
    `RateLimiter`), `rate_limit` and `metrics.rejections`."""

    def authenticate(self, authorization: str | None) -> str | None:
        """-> the key id (a digest prefix); None when the server has no keys; 401 for a missing or wrong key."""
        from tunelab.serve.protocol import APIError  # the wire's error type; protocol imports nothing of this module

        if not self.keys.enabled:
            return None
        who = self.keys.identify(authorization)
        if who is None:
            self.metrics.rejections.labels("auth").inc()
            raise APIError(401, "a valid API key is required (Authorization: Bearer KEY)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return who

    def admit(self, request) -> str:
        """Key, then rate limit (429). -> the caller's id (key digest prefix or client host)."""
        from tunelab.serve.protocol import APIError

        who = self.authenticate(request.headers.get("authorization"))
        if who is None:
            who = request.client.host if request.client else "local"
        wait = self.limiter.take(who)
        if wait:
            self.metrics.rejections.labels("rate_limit").inc()
            raise APIError(429, f"rate limit of {self.rate_limit:g} requests per minute reached; "
                           f"retry in {wait} s", type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(wait)})
        return who
