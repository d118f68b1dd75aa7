"""Writing tunelab's folders and files safely (RELIABILITY W1-W3): what a folder holds, who may write it,
and how an old artifact is replaced by a new one.

- `kind_of(path)`: the kind of tunelab artifact a folder holds ("dataset", "run", "model", ...), read from
  its metadata file (`dataset.json`, `tunelab.json`), or None when tunelab did not write it.
- `write_folder(dest, kind, overwrite)`: an existing `dest` that is not an artifact of `kind` is refused and
  left untouched (an empty folder counts as free); replacing an artifact of `kind` needs `overwrite`. The new
  folder is written in a hidden sibling, every file and folder fsynced, swapped in by one rename
  (`renameat2(RENAME_EXCHANGE)` where the OS has it, two renames otherwise), and only then the old one is
  removed. A crash at any moment leaves the old or the new artifact whole; the leftovers of a crashed writer
  (hidden `.NAME.tunelab-*` siblings) are cleaned up, or the old artifact put back, by the next writer.
- `FolderLock(dest)`: one writer per folder, an OS lock on the hidden sibling file `.NAME.lock` held while
  writing; a second writer gets a `UserError` naming the holder's PID and command.
- `write_file(path, data, overwrite, kind)`: the same rule for single-file outputs (reports, predictions).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from tunelab.errors import UserError

META_FILE = "tunelab.json"
DATASET_FILE = "dataset.json"
TMP_TAG = ".tunelab-"  # hidden siblings: .NAME.tunelab-new-PID (being written), .NAME.tunelab-old-PID


# ---- what a folder holds ---------------------------------------------------------------------------

def kind_of(path: Path) -> str | None:
    """The artifact kind of folder `path`, None if tunelab did not write it. A metadata file that cannot
    be read is a `UserError` (tunelab cannot tell what the folder holds, so it touches nothing)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / DATASET_FILE).is_file():
        return "dataset"
    meta = path / META_FILE
    if meta.is_file():
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"cannot tell what {path} holds: {meta} is unreadable ({err}); nothing was "
                            "changed") from None
        if not isinstance(data, dict):
            raise UserError(f"cannot tell what {path} holds: {meta} is not a JSON object; nothing was changed")
        return str(data.get("kind") or ("model" if "task" in data else "unknown"))
    # run dirs written before run dirs carried a tunelab.json
    if (path / "config.yaml").is_file() and any((path / n).exists() for n in ("metrics.jsonl", "checkpoints")):
        return "run"
    return None


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def article(noun: str) -> str:
    """'a report', 'an export': the noun with its indefinite article."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def check_target(dest: Path, kind: str, overwrite: bool, flag: str = "--overwrite") -> bool:
    """Refuse a `dest` this write may not replace (W1) -> whether an artifact is there to be replaced."""
    if dest.is_symlink():
        raise UserError(f"{dest} is a symbolic link; give the real path (nothing was changed)")
    if not dest.exists() or is_empty_dir(dest):
        return False
    if not dest.is_dir():
        raise UserError(f"{dest} exists and is a file, not {article(kind)} folder; choose another output path "
                        "(nothing was changed)")
    found = kind_of(dest)
    if found is None:
        raise UserError(f"{dest} exists and was not written by tunelab; choose another output path (tunelab "
                        "never deletes or overwrites folders it did not write; nothing was changed)")
    if found != kind:
        raise UserError(f"{dest} holds a tunelab {found}, not {article(kind)}; choose another output path "
                        "(nothing was changed)")
    if not overwrite:
        raise UserError(f"{dest} already holds {article(kind)}; pass {flag} to replace it (the old one is removed only "
                        "once the new one is complete)")
    return True


# ---- one writer per folder -------------------------------------------------------------------------

def lock_path(dest: Path) -> Path:
    dest = Path(os.path.abspath(dest))
    return dest.parent / f".{dest.name}.lock"


_held: dict[str, list] = {}  # lock file -> [fd, depth]: a process may nest its own locks
_held_guard = threading.Lock()


def _try_lock(fd: int, wait: bool) -> bool:
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt  # Windows only

        mode = msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK
        try:
            msvcrt.locking(fd, mode, 1)
            return True
        except OSError:
            return False
    import fcntl  # POSIX only

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
        return (f"PID {info['pid']} on {info['host']}, since {info['since']}: {info['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "PID unknown"


class FolderLock:
    """Context manager: hold the OS lock of folder `dest` (one writer per folder, W3). `wait`: block until
    the holder is done (caches) instead of failing at once. Released when the process ends, however."""

    def __init__(self, dest: str | Path, wait: bool = False):
        self.dest = Path(os.path.abspath(dest))
        self.path = lock_path(self.dest)
        self.wait = wait

    def __enter__(self) -> "FolderLock":
        key = str(self.path)
        with _held_guard:
            if key in _held:
                _held[key][1] += 1
                return self
        if self.dest.parent == self.dest:
            raise UserError(f"cannot write to {self.dest}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot write to {self.dest}: {err.strerror} ({self.path})") from None
        if not _try_lock(fd, self.wait):
            os.close(fd)
            raise UserError(f"{self.dest} is being written by another tunelab process ({_holder(self.path)}); "
                            "one writer per folder: wait for it to finish, or stop it")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        with _held_guard:
            _held[key] = [fd, 1]
        return self

    def __exit__(self, *exc) -> None:
        key = str(self.path)
        with _held_guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1]:
                return
            del _held[key]
        try:
            os.ftruncate(entry[0], 0)  # no stale holder shown to the next writer
        finally:
            os.close(entry[0])  # closing the descriptor releases the lock


def release_inherited_locks() -> None:
    """In a forked child: close its copies of the parent's lock descriptors, so that a child outliving its parent
    does not keep the parent's folders locked (the parent's own descriptors keep them locked while it runs)."""
    with _held_guard:
        for fd, _ in _held.values():
            os.close(fd)
        _held.clear()


# ---- durable writes and the swap -------------------------------------------------------------------

def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot fsync a directory
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file under `root`, then every folder bottom-up: the data is on disk before the rename."""
    for top, dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = Path(top) / name
            if not p.is_symlink():
                fsync_path(p)
        fsync_path(Path(top))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE) -> False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _siblings(dest: Path, tag: str) -> list[Path]:
    prefix = f".{dest.name}{TMP_TAG}{tag}-"
    if not dest.parent.is_dir():
        return []
    return sorted(p for p in dest.parent.iterdir() if p.name.startswith(prefix))


def recover(dest: Path) -> list[str]:
    """Clean up after a writer that crashed (call with the lock held) -> what was done, for the log.

    `.NAME.tunelab-new-*`: a new artifact never swapped in (or, after a swap, the old one being removed):
    deleted. `.NAME.tunelab-old-*`: the old artifact set aside by a two-rename swap: put back if `dest` is
    missing, deleted otherwise."""
    done = []
    for old in _siblings(dest, "old"):
        if not dest.exists():
            os.rename(old, dest)
            done.append(f"restored {dest} from an interrupted replacement")
        else:
            _remove(old)
            done.append(f"removed {old.name}")
    for new in _siblings(dest, "new"):
        _remove(new)
        done.append(f"removed {new.name}")
    for scratch in _siblings(dest, "scratch"):  # a crashed writer's temporary files (this process's are in use)
        if not scratch.name.endswith(f"-{os.getpid()}"):
            _remove(scratch)
            done.append(f"removed {scratch.name}")
    return done


def swap_in(tmp: Path, dest: Path) -> None:
    """Put the complete, fsynced `tmp` at `dest`; the old `dest`, if any, is removed last."""
    parent = dest.parent
    if not dest.exists():
        os.rename(tmp, dest)
        fsync_path(parent)
        return
    if _exchange(tmp, dest):  # now `tmp` holds the old artifact
        fsync_path(parent)
        _remove(tmp)
        return
    old = parent / f".{dest.name}{TMP_TAG}old-{os.getpid()}"
    os.rename(dest, old)  # a crash here: recover() puts `old` back
    os.rename(tmp, dest)
    fsync_path(parent)
    _remove(old)


def new_sibling(dest: Path) -> Path:
    tmp = dest.parent / f".{dest.name}{TMP_TAG}new-{os.getpid()}"
    _remove(tmp)
    return tmp


@contextmanager
def scratch_sibling(dest: str | Path):
    """Yield a new hidden sibling of `dest` for a writer's temporary files (`.NAME.tunelab-scratch-PID`), removed
    afterwards. Call holding `dest`'s lock: a scratch sibling found then is a crashed writer's, and is removed."""
    dest = Path(os.path.abspath(dest))
    for stale in _siblings(dest, "scratch"):
        _remove(stale)
    path = dest.parent / f".{dest.name}{TMP_TAG}scratch-{os.getpid()}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        _remove(path)


@contextmanager
def write_folder(dest: str | Path, kind: str, overwrite: bool = False, wait: bool = False,
                 flag: str = "--overwrite", check: Callable[[Path], None] | None = None):
    """Yield an empty hidden sibling of `dest` to write the new artifact into; on success it replaces
    `dest` (see the module docstring). `kind="cache"` replaces whatever is there (tunelab's own cache).
    `check(dest)` runs under the lock before anything is written (e.g. another refusal rule)."""
    dest = Path(os.path.abspath(dest))
    with FolderLock(dest, wait=wait):  # creates the parent folder if need be
        recover(dest)
        if kind != "cache":
            check_target(dest, kind, overwrite, flag)
        if check is not None:
            check(dest)
        tmp = new_sibling(dest)
        tmp.mkdir()
        try:
            yield tmp
            fsync_tree(tmp)
            if kind == "cache" and dest.exists() and not dest.is_dir():
                dest.unlink()
            swap_in(tmp, dest)
        except BaseException:
            _remove(tmp)
            raise


# ---- single files ----------------------------------------------------------------------------------

def _json_head(path: Path):
    """The first JSON value of a JSON or JSONL file, or None."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(1 << 20)
    except (OSError, UnicodeDecodeError):
        return None
    for candidate in (head, head.split("\n", 1)[0]):
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def _is_report(path: Path) -> bool:
    obj = _json_head(path)
    return isinstance(obj, dict) and (obj.get("kind") == "report" or {"task", "model", "data"} <= set(obj))


def _is_predictions(path: Path) -> bool:
    obj = _json_head(path)
    return isinstance(obj, dict) and "prediction" in obj and "probs" in obj


def _is_overlap(path: Path) -> bool:
    obj = _json_head(path)
    return isinstance(obj, dict) and obj.get("kind") == "overlap"


def _is_plot(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"Software\x00tunelab" in head


def _is_rag_report(path: Path) -> bool:
    obj = _json_head(path)
    return isinstance(obj, dict) and obj.get("kind") == "rag-report"


def _is_recommend_report(path: Path) -> bool:
    obj = _json_head(path)
    return isinstance(obj, dict) and obj.get("kind") == "recommend-report"


def _is_training_data(path: Path) -> bool:
    """`tunelab index training-data`'s JSONL: retrieval pairs or SFT conversations (the first line says which)."""
    obj = _json_head(path)
    return isinstance(obj, dict) and ({"query", "passage"} <= set(obj) or set(obj) == {"messages"})


FILE_KINDS: dict[str, Callable[[Path], bool]] = {"report": _is_report, "predictions": _is_predictions,
                                                 "overlap": _is_overlap, "plot": _is_plot,
                                                 "rag-report": _is_rag_report, "training-data": _is_training_data,
                                                 "recommend-report": _is_recommend_report}


def check_file_target(path: Path, kind: str, overwrite: bool) -> None:
    """The folder rule for a single output file: a file tunelab did not write (or a folder) is refused;
    replacing one of `kind` needs `overwrite`."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UserError(f"{path} exists and is not a regular file; choose another output path "
                        "(nothing was changed)")
    if not path.exists():
        return
    if not FILE_KINDS[kind](path):
        raise UserError(f"{path} exists and was not written by tunelab; choose another output path (tunelab "
                        "never overwrites files it did not write; nothing was changed)")
    if not overwrite:
        raise UserError(f"{path} already holds {article(kind)}; pass --overwrite to replace it")


def write_file(path: str | Path, data: bytes | str | Callable[[Path], None], kind: str,
               overwrite: bool = False, checked: bool = False) -> Path:
    """Write one output file: refused per `check_file_target` (skipped when `checked`), written aside,
    fsynced, renamed over the old one. `data`: the bytes/text, or a function writing the given path."""
    path = Path(os.path.abspath(path))
    if not checked:
        check_file_target(path, kind, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{TMP_TAG}new-{os.getpid()}"
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
