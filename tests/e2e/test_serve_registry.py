"""A server following a registry alias (RELIABILITY R4), as a black box: `tunelab serve registry:NAME@production`
in a subprocess under steady concurrent load while the alias is promoted and rolled back from this process. No
request fails; the `X-Tunelab-Version` header and /v1/models name the version that answered; a version that fails
to load (its store files tampered with) leaves the old one serving, reported by /admin/reload and /metrics."""

import json
import shutil
import threading
import time

import httpx
import pytest

from tunelab.registry import Registry

from serve_process import ServerProcess

ADMIN = "admin-key-0123456789-abcdef"


def _variant(src, out, note):
    shutil.copytree(src, out)
    meta = json.loads((out / "tunelab.json").read_text())
    (out / "tunelab.json").write_text(json.dumps({**meta, "note": note}))
    return out


class Load:
    """Threads posting /v1/classify back to back; every answer's status and version header recorded."""

    def __init__(self, url: str, threads: int = 4):
        self.url, self.stop, self.answers = url, threading.Event(), []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                try:
                    r = c.post(self.url + "/v1/classify", json={"model": "sentiment", "input": ["a great flight"]})
                    self.answers.append((r.status_code, r.headers.get("x-tunelab-version")))
                except httpx.HTTPError as err:
                    self.answers.append((type(err).__name__, None))

    def finish(self) -> list:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        return self.answers


def _wait_for(url: str, version: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        card = httpx.get(url + "/v1/models/sentiment", timeout=10).json()
        if card.get("tunelab_version") == version:
            return
        time.sleep(0.1)
    raise AssertionError(f"the server did not swap to {version} in {timeout} s")


def test_a_server_follows_promotes_and_rollbacks_under_load_without_a_failed_request(tmp_path, tiny_classifier):
    root = tmp_path / "registry"
    with Registry(root) as reg:
        v1 = reg.register(_variant(tiny_classifier, tmp_path / "v1", "one"), "sentiment")["version"]
        v2 = reg.register(_variant(tiny_classifier, tmp_path / "v2", "two"), "sentiment")["version"]
        reg.promote(f"sentiment:{v1}", "production", "first")
    label = {v: f"sentiment:{v[:12]}" for v in (v1, v2)}
    srv = ServerProcess(["registry:sentiment@production", "--registry", str(root), "--registry-poll", "0.2",
                         "--embedding-model", "none"], tmp_path / "serve.log", env={"TUNELAB_ADMIN_KEYS": ADMIN})
    try:
        assert any(label[v1] in line and "following registry:sentiment@production" in line for line in srv.lines)
        load = Load(srv.url)
        with Registry(root) as reg:
            for target, move in [(v2, "promote"), (v1, "rollback"), (v2, "promote"), (v1, "rollback")]:
                time.sleep(0.5)
                if move == "promote":
                    reg.promote(f"sentiment:{target}", "production", "test")
                else:
                    reg.rollback("sentiment", "production", "test")
                _wait_for(srv.url, label[target])
            time.sleep(0.5)
            # a version whose files were tampered with after registration: refused on load, v1 keeps serving
            v3 = reg.register(_variant(tiny_classifier, tmp_path / "v3", "three"), "sentiment")["version"]
            weights = root / "store" / v3 / "model.safetensors"
            weights.chmod(0o644)
            weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
            reg.promote(f"sentiment:{v3}", "production", "tampered")
        time.sleep(1.5)
        answers = load.finish()
        failed = [a for a in answers if a[0] != 200]
        assert not failed and len(answers) > 50, (failed[:5], len(answers))
        seen = [v for _, v in answers]
        assert set(seen) == {label[v1], label[v2]}  # every answer names its version; v3 never answered
        switches = sum(a != b for a, b in zip(seen, seen[1:]))
        assert switches >= 4  # v1 -> v2 -> v1 -> v2 -> v1, each swap seen by the clients
        assert httpx.get(srv.url + "/v1/models/sentiment").json()["tunelab_version"] == label[v1]
        reload = httpx.post(srv.url + "/admin/reload", json={}, headers={"Authorization": f"Bearer {ADMIN}"},
                            timeout=120)
        assert reload.status_code == 200, reload.text
        (entry,) = reload.json()["models"]
        assert not entry["swapped"] and "tampered with" in entry["error"] and entry["version"] == label[v1]
        assert httpx.post(srv.url + "/admin/reload", json={}, headers={"Authorization": "Bearer wrong-key-0123456789"
                                                                                        }).status_code == 401
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'tunelab_model_reloads_total{model="sentiment",outcome="swapped"} 4.0' in metrics
        assert 'tunelab_model_reloads_total{model="sentiment",outcome="failed"}' in metrics
        assert f'tunelab_model_version_info{{model="sentiment",version="{label[v1]}"}} 1.0' in metrics
    finally:
        assert srv.stop() == 0


def test_registry_references_that_cannot_be_served_are_refused_before_start(tmp_path):
    from tunelab.errors import UserError
    from tunelab.serve.registry import check_specs

    root = tmp_path / "registry"
    with pytest.raises(UserError, match="no alias 'production'"):
        check_specs(["registry:nothing@production"], None, registry=lambda: Registry(root))
