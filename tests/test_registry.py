"""The registry (RELIABILITY R1-R3): content-addressed immutable versions verified on load, aliases moved and
rolled back exactly with every move logged, the gate override, lineage, several processes at once — on SQLite,
and on PostgreSQL (a throwaway cluster from Debian's `postgresql` binaries, which `.ci/run` installs, or
TUNELAB_TEST_POSTGRES_URL; skipped where neither is there)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import UserError
from tunelab.registry import Registry
from tunelab.registry.store import manifest, version_of



def _variant(src: Path, out: Path, **meta_fields) -> Path:
    """A copy of model dir `src` whose tunelab.json has `meta_fields` added: another version, same weights."""
    shutil.copytree(src, out)
    meta = json.loads((out / "tunelab.json").read_text())
    (out / "tunelab.json").write_text(json.dumps({**meta, **meta_fields}))
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def reg(request, tmp_path):
    db = None
    if request.param == "postgresql":
        from sqlalchemy import create_engine, text

        db = request.getfixturevalue("postgres_url")
        engine = create_engine(db)
        with engine.begin() as conn:  # a clean database for each test
            conn.execute(text("DROP TABLE IF EXISTS versions, aliases, events"))
        engine.dispose()
    r = Registry(tmp_path / "registry", db)
    yield r
    r.close()


@pytest.fixture
def three(tmp_path, tiny_classifier):
    """Three versions of one model line: v1, v2 (gate passed), v3 (gate failed)."""
    gate = {"passed": True, "reason": "the new data gained +0.05, the old data lost 0.00"}
    bad = {"passed": False, "reason": "the old data lost 0.20, more than 0.01"}
    return [_variant(tiny_classifier, tmp_path / "v1", note="one"),
            _variant(tiny_classifier, tmp_path / "v2", update={"gate": gate}),
            _variant(tiny_classifier, tmp_path / "v3", update={"gate": bad})]


def test_a_version_is_the_content_hash_of_an_immutable_copy(reg, three, tmp_path):
    rec = reg.register(three[0], "sentiment", "first")
    assert rec["version"] == version_of(manifest(three[0])) and len(rec["version"]) == 64
    _, path = reg.resolve("sentiment")
    assert manifest(path) == manifest(three[0]) and path.parent == reg.store
    assert reg.register(three[0], "sentiment")["registered_at"] == rec["registered_at"]  # again: nothing new
    assert [e["action"] for e in reg.log("sentiment")] == ["register"]
    other = reg.register(three[0], "sentiment-copy")  # the same content under another name: one folder
    assert other["version"] == rec["version"] and len([p for p in reg.store.iterdir() if p.name[0] != "."]) == 1
    (three[0] / "notes.txt").write_text("changed after registering")  # the source changes; the version does not
    assert reg.resolve(f"sentiment:{rec['version'][:8]}")[0]["version"] == rec["version"]


@pytest.mark.parametrize("tamper", ["edit", "add", "remove"])
def test_a_tampered_store_file_is_refused_on_load(reg, three, tamper):
    rec = reg.register(three[0], "sentiment")
    folder = reg.store / rec["version"]
    weights = folder / "model.safetensors"
    weights.chmod(0o644)
    if tamper == "edit":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    elif tamper == "add":
        (folder / "extra.bin").write_bytes(b"x")
    else:
        weights.unlink()
    with pytest.raises(UserError, match="tampered with"):
        reg.resolve("sentiment")


def test_promote_and_rollback_walk_the_history_exactly(reg, three):
    v = [reg.register(d, "sentiment")["version"] for d in three[:2]]
    reg.promote(f"sentiment:{v[0][:12]}", "production", "first release")
    reg.promote(f"sentiment:{v[1][:12]}", "production", "airline update")
    reg.promote(f"sentiment:{v[0][:12]}", "staging")
    assert reg.show("sentiment@production")["version"] == v[1]
    back = reg.rollback("sentiment", "production", "complaints about the update")
    assert (back["version"], back["previous"], back["action"]) == (v[0], v[1], "rollback")
    assert reg.show("sentiment@production")["version"] == v[0]
    assert reg.show("sentiment@staging")["version"] == v[0]  # another alias is not touched
    with pytest.raises(UserError, match="no earlier version"):
        reg.rollback("sentiment", "production")
    with pytest.raises(UserError, match="already points at"):
        reg.promote(f"sentiment:{v[0][:12]}", "production")
    moves = reg.log("sentiment", "production")
    assert [(e["action"], e["previous"], e["version"]) for e in moves] == [
        ("promote", None, v[0]), ("promote", v[0], v[1]), ("rollback", v[1], v[0])]
    assert moves[-1]["reason"] == "complaints about the update" and "pid" in moves[-1]["actor"]
    assert reg.show(f"sentiment:{v[0][:12]}")["aliases"] == ["production", "staging"]


def test_a_failed_gate_needs_a_logged_override_with_a_reason(reg, three):
    bad = reg.register(three[2], "sentiment")
    assert bad["gate_passed"] is False and "lost 0.20" in bad["lineage"]["gate"]["reason"]
    with pytest.raises(UserError, match="failed its update gate .*--override-gate"):
        reg.promote("sentiment", "production")
    with pytest.raises(UserError, match="needs a --reason"):
        reg.promote("sentiment", "production", override=True)
    ev = reg.promote("sentiment", "production", "hotfix: the old domain is retired", override=True)
    assert ev["override"] is True and reg.log("sentiment", "production")[-1]["override"] in (True, 1)


def test_lineage_names_the_parent_version_data_and_config(reg, tmp_path, tiny_classifier, small_dataset, four_labels):
    from tunelab.train.update import update

    parent = reg.register(tiny_classifier, "sentiment")
    update(tiny_classifier, four_labels, tmp_path / "upd", replay=0.3, overrides=["train.epochs=2"])
    child = reg.register(tmp_path / "upd" / "model", "sentiment")
    lin = child["lineage"]
    assert lin["parent"]["version"] == f"sentiment:{parent['version']}"
    assert lin["data"]["replay"] and lin["gate"] is not None and child["gate_passed"] == lin["gate"]["passed"]
    assert lin["config"]["data"]["replay"]["share"] == 0.3 and "question" in lin["labels"]
    d = reg.diff(f"sentiment:{parent['version'][:8]}", f"sentiment:{child['version'][:8]}")
    keys = {row["key"] for row in d["lineage"]}
    assert "data.fingerprint" in keys and "labels" in keys and "model.safetensors" in d["files"]


def test_refusals_are_one_line(reg, tmp_path, three):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    for call, message in [(lambda: reg.register(tmp_path / "plain", "x"), "not a tunelab model dir"),
                          (lambda: reg.register(three[0], "bad name!"), "registry name"),
                          (lambda: reg.promote("nothing", "production"), "no such version"),
                          (lambda: reg.promote("sentiment:abc", "production"), "6 or more hex"),
                          (lambda: reg.promote("sentiment", "no/slash"), "alias"),
                          (lambda: reg.log("nothing"), "no event")]:
        with pytest.raises(UserError, match=message):
            call()
    link = tmp_path / "linked"
    shutil.copytree(three[0], link)
    (link / "outside").symlink_to("/etc/hostname")
    with pytest.raises(UserError, match="symlink"):
        reg.register(link, "x")


WORKER = textwrap.dedent("""
    import sys
    from tunelab.errors import UserError
    from tunelab.registry import Registry
    root, db, name, rounds = sys.argv[1], sys.argv[2] or None, sys.argv[3], int(sys.argv[4])
    dirs = sys.argv[5:]
    moved = 0
    with Registry(root, db) as reg:
        versions = [reg.register(d, name, "worker")["version"] for d in dirs]
        for i in range(rounds):
            try:
                reg.promote(f"{name}:{versions[i % len(versions)]}", "production", f"round {i}")
                moved += 1
            except UserError as err:
                assert "already points" in str(err), err
    print(moved)
""")


def test_two_processes_registering_and_promoting_at_once_lose_nothing(reg, three, tmp_path):
    dirs = [str(d) for d in three[:2]]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(reg.root), reg.db.url if not reg.db.sqlite else "",
                               "sentiment", "25", *(dirs if k == 0 else dirs[::-1])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    moved = sum(int(o[0].strip()) for o in outs)
    events = reg.log("sentiment")
    assert sum(e["action"] == "register" for e in events) == 2  # each version registered once, by one of them
    promotes = [e for e in events if e["action"] == "promote"]
    assert len(promotes) == moved > 0
    for before, after in zip(promotes, promotes[1:]):  # one chain: every move starts where the last one ended
        assert after["previous"] == before["version"] and after["version"] != before["version"]
    assert reg.show("sentiment@production")["version"] == promotes[-1]["version"]


def test_cli_walk_through(tmp_path, three):
    root = str(tmp_path / "cli-registry")
    run = CliRunner().invoke
    assert run(app, ["registry", "register", str(three[0]), "--name", "s", "--registry", root]).exit_code == 0
    res = run(app, ["registry", "register", str(three[1]), "--name", "s", "--registry", root, "--json"])
    v2 = json.loads(res.output)["version"]
    assert run(app, ["registry", "promote", "s", "--alias", "production", "--registry", root]).exit_code == 0
    res = run(app, ["registry", "list", "s", "--registry", root])
    assert res.exit_code == 0 and v2[:12] in res.output and "production" in res.output
    res = run(app, ["registry", "log", "s", "--registry", root, "--json"])
    assert [e["action"] for e in json.loads(res.output)] == ["register", "register", "promote"]
    res = run(app, ["registry", "show", "s@production", "--verify", "--registry", root])
    assert json.loads(res.output)["verified"] is True


def test_an_export_registers_with_its_parity_and_its_parent_version(reg, tiny_classifier, classifier_onnx):
    parent = reg.register(tiny_classifier, "sentiment")
    exported = reg.register(classifier_onnx, "sentiment-onnx")
    assert exported["kind"] == "export" and exported["lineage"]["export"]["format"] == "onnx"
    assert exported["lineage"]["export"]["parity"]  # the figures of its parity check
    assert exported["lineage"]["parent"]["version"] == f"sentiment:{parent['version']}"
