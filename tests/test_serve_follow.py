"""Following a registry alias in the server, in-process: a generation model swaps with its warm-up, the old engine
retires once idle, a request that looked up a retired encoder is answered by the new version, and what cannot be
followed is refused. (The swap under load, as a black box: tests/e2e/test_serve_registry.py.)"""

import asyncio
import json
import shutil
import time
from types import SimpleNamespace

import pytest

from tunelab.config import ServeConfig
from tunelab.errors import UserError
from tunelab.registry import Registry
from tunelab.serve import follow
from tunelab.serve.engine import MicroBatcher
from tunelab.serve.follow import Follower
from tunelab.serve.metrics import Metrics
from tunelab.serve.registry import Registry as ServedModels
from tunelab.serve.registry import Served, check_specs
from tunelab.serve.routes.encoders import _encode
from tunelab.serve.state import Call


def _variant(src, out, note):
    shutil.copytree(src, out)
    meta = json.loads((out / "tunelab.json").read_text())
    (out / "tunelab.json").write_text(json.dumps({**meta, "note": note}))
    return out


def test_a_generation_model_swaps_after_its_warm_up_and_the_old_engine_retires(tmp_path, sft_lora, monkeypatch):
    monkeypatch.setattr(follow, "RETIRE_GRACE_S", 0.0)
    root = tmp_path / "registry"
    with Registry(root) as reg:
        v1, v2 = (reg.register(_variant(sft_lora, tmp_path / n, n), "chat")["version"] for n in ("one", "two"))
        reg.promote(f"chat:{v1}", "production")
    cfg = ServeConfig(models=["registry:chat@production"], registry=root, registry_poll_s=0, embedding_model=None)
    specs = check_specs(cfg.models, None, registry=lambda: Registry(root))
    assert specs[0].follow == "chat@production" and specs[0].version == f"chat:{v1[:12]}"
    metrics = Metrics()
    models = ServedModels(specs, cfg, metrics, "cpu")
    models.load()
    follower = Follower(models, cfg, metrics)
    follower.start()
    try:
        old = models.models["chat"]
        assert follower.check()[0]["swapped"] is False  # the alias has not moved
        with Registry(root) as reg:
            reg.promote(f"chat:{v2}", "production")
        (result,) = follower.check()
        assert result["swapped"] and result["version"] == f"chat:{v2[:12]}" and result["previous"] == old.version
        new = models.models["chat"]
        assert new is not old and models.listing()[0].tunelab_version == new.version == f"chat:{v2[:12]}"
        deadline = time.time() + 30
        while old in models.retiring and time.time() < deadline:
            time.sleep(0.05)
        assert old not in models.retiring and old.engine._stopped  # closed once idle
        with pytest.raises(UserError, match="does not follow a registry alias"):
            follower.check("other")
    finally:
        follower.close()
        models.close()


def test_a_request_that_looked_up_a_retired_version_is_answered_by_the_new_one():
    def batcher(tag):
        return MicroBatcher(lambda texts: [{"tag": tag, "tokens": 1} for _ in texts], name=tag)

    old = Served("m", "classify", 0, batcher=batcher("old"), version="m:old")
    new = Served("m", "classify", 0, batcher=batcher("new"), version="m:new")
    old.close()  # retired between the lookup and the submission
    state = SimpleNamespace(settings=SimpleNamespace(encoder_batch=8), registry=SimpleNamespace(models={"m": new}),
                            overloaded=lambda err: AssertionError(f"refused: {err}"))
    request = SimpleNamespace(state=SimpleNamespace())
    call = Call(state, SimpleNamespace(texts=lambda: ["a text"]), old, 0.0, request)
    assert request.state.tunelab_version == "m:old"
    try:
        assert asyncio.run(_encode(call))[0]["tag"] == "new"
        assert call.served is new and request.state.tunelab_version == "m:new"
    finally:
        new.close()
