"""The folder-writing rule (W1-W3): nothing a user owns is deleted, replacement by swap, one writer per folder."""

import json
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest

from tunelab import artifacts
from tunelab.artifacts import FolderLock, write_file, write_folder
from tunelab.errors import UserError


def _dataset(tmp, marker: str) -> None:
    (tmp / "dataset.json").write_text(json.dumps({"kind": "dataset", "marker": marker}))
    (tmp / "train.jsonl").write_text(marker * 100)


def _marker(d) -> str:
    return json.loads((d / "dataset.json").read_text())["marker"]


def test_a_users_folder_is_refused_and_left_untouched(tmp_path):
    thesis = tmp_path / "out"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not written by tunelab"):
            with write_folder(thesis, "dataset", overwrite=overwrite) as tmp:
                _dataset(tmp, "new")
    assert [p.name for p in thesis.iterdir()] == ["thesis.tex"]
    assert (thesis / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        with write_folder(tmp_path / "file", "dataset", overwrite=True):
            pass
    assert (tmp_path / "file").read_text() == "x"


def test_another_kind_is_refused_and_the_same_kind_needs_overwrite(tmp_path):
    out = tmp_path / "ds"
    with write_folder(out, "dataset") as tmp:
        _dataset(tmp, "old")
    with pytest.raises(UserError, match="holds a tunelab dataset, not a model"):
        with write_folder(out, "model", overwrite=True):
            pass
    with pytest.raises(UserError, match="already holds a dataset; pass --overwrite"):
        with write_folder(out, "dataset"):
            pass
    assert _marker(out) == "old"
    with write_folder(out, "dataset", overwrite=True) as tmp:
        _dataset(tmp, "new")
    assert _marker(out) == "new"
    # nothing left beside it but the lock file
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.lock", "ds"]


def test_an_empty_folder_counts_as_free(tmp_path):
    (tmp_path / "ds").mkdir()
    with write_folder(tmp_path / "ds", "dataset") as tmp:
        _dataset(tmp, "new")
    assert _marker(tmp_path / "ds") == "new"


def test_a_failed_write_leaves_the_old_artifact_whole(tmp_path):
    out = tmp_path / "ds"
    with write_folder(out, "dataset") as tmp:
        _dataset(tmp, "old")
    with pytest.raises(RuntimeError):
        with write_folder(out, "dataset", overwrite=True) as tmp:
            _dataset(tmp, "new")
            raise RuntimeError("crash while writing")
    assert _marker(out) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.lock", "ds"]


def test_two_rename_fallback_and_recovery_after_a_crash_between_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    out = tmp_path / "ds"
    with write_folder(out, "dataset") as tmp:
        _dataset(tmp, "old")
    with write_folder(out, "dataset", overwrite=True) as tmp:
        _dataset(tmp, "new")
    assert _marker(out) == "new"
    # a writer killed after moving the old artifact aside, before renaming the new one in
    os.rename(out, tmp_path / ".ds.tunelab-old-99999")
    (tmp_path / ".ds.tunelab-new-99999").mkdir()
    (tmp_path / ".ds.tunelab-new-99999" / "half").write_text("x")
    with pytest.raises(UserError, match="already holds a dataset"):  # the next writer restores it first
        with write_folder(out, "dataset"):
            pass
    assert _marker(out) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.lock", "ds"]


WRITER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from tunelab.artifacts import write_folder
    out, n = Path(sys.argv[1]), 0
    while True:
        n += 1
        with write_folder(out, "dataset", overwrite=True) as tmp:
            for i in range(20):
                (tmp / f"part-{i}.txt").write_text(str(n) * 2000)
            (tmp / "dataset.json").write_text(json.dumps({"kind": "dataset", "n": n}))
        print(n, flush=True)
""")


def test_kill_9_at_any_moment_leaves_the_old_or_the_new_artifact_whole(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    out = tmp_path / "ds"
    rng = random.Random(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one complete write
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        proc.stdout.close()
        # the next writer would clean up; a reader sees a whole artifact even before that
        n = json.loads((out / "dataset.json").read_text())["n"]
        parts = sorted(out.glob("part-*.txt"))
        assert len(parts) == 20 and all(p.read_text() == str(n) * 2000 for p in parts)
        with FolderLock(out):
            artifacts.recover(out)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.lock", "ds", "writer.py"]


HOLDER = textwrap.dedent("""
    import sys, time
    from tunelab.artifacts import FolderLock
    with FolderLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_one_writer_per_folder_names_the_holder(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    out = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"being written by another tunelab process \(PID {proc.pid} "):
            with write_folder(out, "dataset") as tmp:
                _dataset(tmp, "second")
        assert not out.exists()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    with write_folder(out, "dataset") as tmp:  # released when its holder died
        _dataset(tmp, "after")
    assert _marker(out) == "after"


def test_a_process_may_nest_its_own_lock(tmp_path):
    with FolderLock(tmp_path / "run"):
        with write_folder(tmp_path / "run", "run") as tmp:
            (tmp / "tunelab.json").write_text(json.dumps({"kind": "run"}))
    assert artifacts.kind_of(tmp_path / "run") == "run"


def test_output_files_follow_the_same_rule(tmp_path):
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    with pytest.raises(UserError, match="not written by tunelab"):
        write_file(mine, "{}", "report", overwrite=True)
    assert mine.read_text() == '{"my": "notes"}'
    report = tmp_path / "report.json"
    write_file(report, json.dumps({"kind": "report", "n": 1}), "report")
    with pytest.raises(UserError, match="pass --overwrite"):
        write_file(report, json.dumps({"kind": "report", "n": 2}), "report")
    write_file(report, json.dumps({"kind": "report", "n": 2}), "report", overwrite=True)
    assert json.loads(report.read_text())["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json", "report.json"]


def test_an_unreadable_metadata_file_means_hands_off(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "tunelab.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot tell what .* holds"):
        with write_folder(d, "model", overwrite=True):
            pass
    assert (d / "tunelab.json").read_text() == "{not json"
