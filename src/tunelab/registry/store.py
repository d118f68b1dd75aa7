"""The registry's content-addressed store: each version is a read-only copy of a model (or export) dir in
`STORE/<version>/`, where the version is the sha256 of the dir's manifest (every file's relative path, size and
sha256, sorted). The same content registered twice, by any name or process, is one folder.

- `manifest(d)` -> {relative path: {"size", "sha256"}} of every regular file under `d`; a symlink or a special
  file is refused (a version must be the bytes it names, not a pointer to other bytes).
- `version_of(manifest)`: the sha256 of that manifest in canonical JSON.
- `put(store, src)`: copy `src` into a hidden sibling, fsync it, check the copy against the manifest taken before
  the copy (a source that changed meanwhile is refused), then rename it into place (another process that put the
  same content first wins; its copy is verified instead).
- `verify(store, version, manifest)`: every file present with its size and sha256, and nothing else; a changed,
  missing or added file is a `UserError` naming it. Loading a version always verifies it first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from pathlib import Path

from tunelab.artifacts import fsync_path, fsync_tree
from tunelab.errors import UserError
from tunelab.model_files import sha256_file

INCOMING = ".incoming"


def manifest(d: Path) -> dict[str, dict]:
    """{relative path (POSIX): {"size", "sha256"}} of every file under `d`; symlinks and special files refused."""
    d = Path(d)
    out = {}
    for top, dirs, files in os.walk(d):
        dirs.sort()
        for name in sorted(files) + [x for x in dirs if (Path(top) / x).is_symlink()]:
            p = Path(top) / name
            rel = p.relative_to(d).as_posix()
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode) or not stat.S_ISREG(mode):
                raise UserError(f"{p} is a {'symlink' if stat.S_ISLNK(mode) else 'special file'}; a registered "
                                "version holds regular files only (copy what it points to into the dir)")
            out[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    if not out:
        raise UserError(f"{d} is empty; nothing to register")
    return dict(sorted(out.items()))


def version_of(files: dict[str, dict]) -> str:
    """The content address of a manifest: sha256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def path_of(store: Path, version: str) -> Path:
    return Path(store) / version


def put(store: Path, src: Path, files: dict[str, dict]) -> Path:
    """Copy `src` (whose manifest `files` was taken just before) into the store under its version -> its path."""
    store, version = Path(store), version_of(files)
    dest = path_of(store, version)
    if dest.is_dir():
        verify(store, version, files)
        return dest
    incoming = store / INCOMING
    incoming.mkdir(parents=True, exist_ok=True)
    tmp = incoming / f"{version[:16]}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(src, tmp, symlinks=True)
        copied = manifest(tmp)
        if copied != files:
            changed = sorted(k for k in set(copied) | set(files) if copied.get(k) != files.get(k))
            raise UserError(f"{src} changed while it was being registered ({', '.join(changed[:3])}); register "
                            "it again once nothing writes to it")
        for p in tmp.rglob("*"):
            if p.is_file():
                p.chmod(0o444)  # a reminder, not a defence: verify() is the defence
        fsync_tree(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process put the same content first
            if not dest.is_dir():
                raise
        fsync_path(store)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)  # its read-only files go with it: unlinking needs the folder's permission only
    verify(store, version, files)
    return dest


def verify(store: Path, version: str, files: dict[str, dict]) -> Path:
    """The version's folder, after checking that it holds exactly `files` (sizes and sha256) -> its path."""
    d = path_of(store, version)
    if not d.is_dir():
        raise UserError(f"version {version[:12]} is registered but its files are gone from the store ({d})")
    try:
        found = manifest(d)
    except UserError as err:
        raise UserError(f"version {version[:12]} in the store is damaged: {err}") from None
    if found != files:
        changed = sorted(k for k in set(found) | set(files) if found.get(k) != files.get(k))
        what = ", ".join(f"{k} ({_how(found.get(k), files.get(k))})" for k in changed[:3])
        raise UserError(f"version {version[:12]} in the store was tampered with: {what}; the registry refuses to "
                        f"load it (register the model dir again, or restore {d})")
    return d


def _how(found: dict | None, want: dict | None) -> str:
    if found is None:
        return "missing"
    if want is None:
        return "added"
    return "size changed" if found["size"] != want["size"] else "content changed"
