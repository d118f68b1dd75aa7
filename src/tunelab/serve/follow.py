"""Models served from a registry alias (`tunelab serve registry:NAME@ALIAS`) follow the alias (RELIABILITY R4).

A thread checks each followed alias every `registry_poll_s` seconds (or when `POST /admin/reload` asks). When
the alias points at another version than the one answering:

1. the new version is loaded beside the old one, on this thread at a lower CPU priority (Linux: the thread's
   nice value) and with the GIL handed over more often, its files verified against the registry first; its
   engine's thread is started at the server's priority (`engine.ThreadStarter`), not the loader's;
2. it is warmed: one request through its engine, which must answer;
3. it replaces the old one in the server's table in one assignment: a request that has looked its model up keeps
   the old one, every later request gets the new one;
4. the old one is retired: closed once `RETIRE_GRACE_S` have passed and nothing is queued or running on it.

If loading or warming fails, the old version keeps serving; the failure is logged, counted
(`tunelab_model_reloads_total{outcome="failed"}`) and not retried for that version until the alias moves again
or an admin asks. Swaps are one at a time.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from tunelab.errors import UserError
from tunelab.serve.registry import Registry, Served, Spec, registry_spec, version_label

log = logging.getLogger("tunelab.serve")

RETIRE_GRACE_S = 2.0  # a request that looked the old version up just before the swap submits within this
WARM_TIMEOUT_S = 120.0
NICE = 10  # the loading thread's CPU priority: below the engines, so serving goes on while a version loads
# While a version loads, the GIL changes hands every 1 ms instead of Python's 5: the loader's Python work (building
# the model) then delays the event loop and the engines by about that much at a time (hot-swap p99 2.2x -> 1.9x)
SWITCH_INTERVAL_S = 0.001


class Follower:
    """Keeps the followed models of `models` (a serve `Registry`) on their aliases' versions."""

    def __init__(self, models: Registry, settings, metrics):
        self.models, self.settings, self.metrics = models, settings, metrics
        self.specs = {s.id: s for s in models.specs if s.follow}
        self.failed: dict[str, str] = {}  # model id -> the version that failed to load (not retried by polling)
        self.errors: dict[str, str] = {}  # model id -> the last failure's message
        self._lock = threading.Lock()  # one swap at a time
        self._stop = threading.Event()
        self._registry = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Record the versions answering, and start polling (unless `registry_poll_s` is 0). Called on a thread at
        the server's priority: engines built later start their threads from here (`engine.ThreadStarter`)."""
        from tunelab.serve import engine

        for model_id, spec in self.specs.items():
            self.metrics.version.labels(model_id, spec.version).set(1)
        if self.specs and engine.STARTER is None:
            engine.STARTER = engine.ThreadStarter()
        if self.specs and self.settings.registry_poll_s > 0:
            self._thread = threading.Thread(target=self._poll, name="registry-follower", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._registry is not None:
            self._registry.close()

    def _poll(self) -> None:
        _lower_priority()
        said = None
        while not self._stop.wait(self.settings.registry_poll_s):
            try:
                self.check(retry_failed=False)
                said = None
            except UserError as err:  # the alias removed, the database gone: said once, until it changes
                if str(err) != said:
                    log.error("checking the registry: %s (serving on with the versions loaded)", err)
                    said = str(err)
            except Exception:  # noqa: BLE001 - the follower must outlive a database hiccup; the next poll retries
                log.exception("checking the registry failed")

    def reload(self, model_id: str | None = None) -> list[dict]:
        """`check` now, failed versions included, on a thread of its own at the lower priority (POST
        /admin/reload)."""
        result: dict = {}

        def run() -> None:
            _lower_priority()
            try:
                result["out"] = self.check(model_id, retry_failed=True)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread below
                result["err"] = err

        thread = threading.Thread(target=run, name="registry-reload", daemon=True)
        thread.start()
        thread.join()
        if "err" in result:
            raise result["err"]
        return result["out"]

    def registry(self):
        from tunelab.registry import Registry as ModelRegistry  # SQLAlchemy: only when a model follows an alias

        if self._registry is None:
            self._registry = ModelRegistry(self.settings.registry, self.settings.registry_db)
        return self._registry

    def check(self, model_id: str | None = None, retry_failed: bool = True) -> list[dict]:
        """Swap every followed model (or `model_id`) whose alias has moved -> per model {id, alias, version,
        swapped, error}. `retry_failed=False` (polling) skips a version that already failed."""
        if model_id is not None and model_id not in self.specs:
            raise UserError(f"'{model_id}' does not follow a registry alias; followed: "
                            f"{', '.join(self.specs) or 'none'}")
        out = []
        with self._lock:
            for mid, spec in self.specs.items():
                if model_id is not None and mid != model_id:
                    continue
                out.append(self._check_one(mid, spec, retry_failed))
        return out

    def _check_one(self, model_id: str, spec: Spec, retry_failed: bool) -> dict:
        current = self.models.models[model_id]
        want = version_label(self.registry().show(spec.follow))
        result = {"id": model_id, "alias": spec.follow, "version": current.version, "swapped": False, "error": None}
        if want == current.version or (not retry_failed and self.failed.get(model_id) == want):
            result["error"] = self.errors.get(model_id) if self.failed.get(model_id) == want else None
            return result
        started, interval = time.perf_counter(), sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SWITCH_INTERVAL_S))
        try:
            new = self._load(spec, want)
        except Exception as err:  # noqa: BLE001 - whatever broke the new version, the old one keeps serving
            message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            if not isinstance(err, UserError):
                log.exception("loading %s for %s failed", want, model_id)
            log.error("kept %s for %s: loading %s failed: %s", current.version, model_id, want, message)
            self.failed[model_id], self.errors[model_id] = want, message
            self.metrics.reloads.labels(model_id, "failed").inc()
            return {**result, "error": message}
        finally:
            sys.setswitchinterval(interval)
        self.models.models[model_id] = new  # the swap: one assignment, atomic for every reader
        self.failed.pop(model_id, None)
        self.errors.pop(model_id, None)
        self.metrics.reloads.labels(model_id, "swapped").inc()
        self.metrics.version.labels(model_id, current.version).set(0)
        self.metrics.version.labels(model_id, new.version).set(1)
        log.info("%s now answers with %s (was %s; loaded and warmed in %.1f s)", model_id, new.version,
                 current.version, time.perf_counter() - started)
        self._retire(current)
        return {**result, "version": new.version, "previous": current.version, "swapped": True}

    def _load(self, spec: Spec, want: str) -> Served:
        """The version `want` (NAME:VERSION) loaded as `spec`'s model and warmed."""
        fresh = registry_spec(want, spec.id, self.registry())
        fresh.follow = spec.follow
        served = self.models.build(fresh)
        try:
            warm(served)
        except BaseException:
            served.close()
            raise
        return served

    def _retire(self, old: Served) -> None:
        """Close `old` once the grace period has passed and nothing is queued or running on it."""
        self.models.retiring.append(old)

        def retire() -> None:
            time.sleep(RETIRE_GRACE_S)
            deadline = time.monotonic() + self.settings.drain_timeout_s
            while old.busy() and time.monotonic() < deadline:
                time.sleep(0.05)
            old.close()
            self.models.retiring.remove(old)

        threading.Thread(target=retire, name=f"retire-{old.id}", daemon=True).start()


def warm(served: Served) -> None:
    """One request through the new version's engine; it must answer (else the swap does not happen)."""
    if served.batcher is not None:
        served.batcher.submit(["warm-up"]).result(timeout=WARM_TIMEOUT_S)
        return
    if served.runtime != "pytorch":  # llama.cpp loads its file whole; its first request is not slower
        return
    from tunelab.serve.engine import DoneEvent, ErrorEvent, SamplingParams, Sequence

    done, failure = threading.Event(), []

    def sink(event) -> None:
        if isinstance(event, ErrorEvent):
            failure.append(event)
        if isinstance(event, (DoneEvent, ErrorEvent)):
            done.set()

    served.engine.submit([Sequence(served.text_prompt("Hello"), SamplingParams(max_tokens=1, temperature=0), sink,
                                   adapter=served.adapter)])
    if not done.wait(WARM_TIMEOUT_S) or failure:
        raise RuntimeError(f"the warm-up request failed: {failure[0] if failure else 'no answer'}")


def _lower_priority() -> None:
    """Lower this thread's CPU priority (Linux gives each thread its own nice value); elsewhere nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except (AttributeError, OSError):
        pass
