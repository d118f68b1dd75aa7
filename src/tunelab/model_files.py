"""Checks on model files before anything loads them (RELIABILITY X1, X3): each problem is one `UserError`
naming the file and what is wrong, never a traceback from a parser.

- Only safetensors weights are loaded: a folder whose weights are pickles (`pytorch_model.bin`, `*.pt`,
  `adapter_model.bin`, ...) is refused without opening them.
- A safetensors file's header is checked against its size (a truncated or corrupt file is caught before a
  loader reads it, with bounded memory: the header is at most 100 MB), then every tensor is checked finite,
  one tensor at a time.
- A model dir's file list (sizes + sha256 in `tunelab.json`, written when it was saved) is verified.
- A tokenizer folder must hold its tokenizer files.
- A GGUF file must parse (header, metadata, tensor table, data within the file).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from tunelab.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER = 100 << 20
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "I16": 2,
               "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
CONFIG_FILES = ("config.json", "adapter_config.json", "houlsby_config.json", "generation_config.json")
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                         "sentencepiece.bpe.model")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weight_files(d: Path) -> list[Path]:
    """The safetensors files of a model folder; a folder with only pickled weights is refused (X1)."""
    d = Path(d)
    safe = sorted(d.glob("*.safetensors"))
    if safe:
        return safe
    pickles = sorted(p.name for p in d.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{d / pickles[0]} is a pickle file; tunelab loads safetensors weights only (unpickling "
                        "can run arbitrary code). Convert it to safetensors where you trust its source, e.g. "
                        "`model.save_pretrained(dir, safe_serialization=True)`")
    raise UserError(f"{d} holds no model weights (no .safetensors file)")


def _bad(path: Path, what: str) -> UserError:
    return UserError(f"{path}: truncated or corrupt safetensors file ({what}); save or download it again")


def check_safetensors_header(path: Path) -> dict:
    """The parsed header of a safetensors file after checking it against the file's size -> {name: info}."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise _bad(path, f"{size} bytes")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > MAX_HEADER:
            raise _bad(path, f"header length {n:,} but the file has {size:,} bytes")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _bad(path, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    data, end = size - 8 - n, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for dim in shape:
                count *= int(dim)
        except (KeyError, TypeError, ValueError):
            raise _bad(path, f"tensor {name} has a malformed entry") from None
        width = DTYPE_BYTES.get(dtype)
        if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop <= data):
            raise _bad(path, f"tensor {name} lies outside the file's {data:,} data bytes")
        if width is not None and stop - begin != count * width:
            raise _bad(path, f"tensor {name} holds {stop - begin:,} bytes for {count:,} {dtype} values")
        end = max(end, stop)
    if end != data:
        raise _bad(path, f"{data - end:,} data bytes not described by the header")
    return header


def check_weights(path: Path, finite: bool = True) -> None:
    """Header check, then (if `finite`) every floating-point tensor finite, one tensor in memory at a time."""
    # torch (~1 s) and safetensors: only the finiteness scan uses them; the other checks in this module read bytes
    import torch
    from safetensors import SafetensorError, safe_open

    check_safetensors_header(path)
    if not finite:
        return
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    bad = int((~torch.isfinite(t)).sum())
                    raise UserError(f"{path}: tensor {name} has {bad:,} non-finite values (NaN or inf) of "
                                    f"{t.numel():,}; the weights are unusable")
    except SafetensorError as err:
        raise _bad(path, str(err)) from None


def check_model_folder(d: Path, files: dict | None = None) -> None:
    """All weight files of a model folder checked. A file listed in `files` (sizes and sha256 recorded when
    tunelab saved it, after checking its tensors finite) must match them, and then needs no finiteness pass:
    its bytes are the ones checked then. Any other weight file gets the header and finiteness checks."""
    d = Path(d)
    for name in CONFIG_FILES:
        _check_json(d / name)
    files = files or {}
    for name in files:
        if not (d / name).is_file():
            raise UserError(f"{d / name} is missing (listed in {d / 'tunelab.json'})")
    for path in weight_files(d):
        info = files.get(path.name)
        if info is None:
            check_weights(path)
            continue
        if path.stat().st_size != info.get("size") or sha256_file(path) != info.get("sha256"):
            raise UserError(f"{path} does not match the size and sha256 recorded when it was saved; the file is "
                            "damaged or was changed")
        check_safetensors_header(path)


def check_tokenizer_folder(d: Path) -> None:
    d = Path(d)
    if not any((d / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        raise UserError(f"{d}: the tokenizer files are missing (expected one of {', '.join(TOKENIZER_VOCAB_FILES)})")
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "config.json"):
        _check_json(d / name)


def _check_json(path: Path) -> None:
    """A JSON file, if present, parses (a loader's own message would blame something else)."""
    if path.is_file():
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{path} is corrupt: {err}") from None


def check_gguf(path: Path) -> None:
    """A GGUF file that parses: header, metadata, tensor table, and every tensor's data within the file."""
    from gguf import GGUFReader  # ~0.15 s; only a .gguf base is read with it

    path = Path(path)
    try:
        reader = GGUFReader(path)
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} ends beyond the end of the file")
    except Exception as err:  # noqa: BLE001 - any parser failure on a user's file means the file is bad
        raise UserError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None


def files_manifest(d: Path) -> dict[str, dict]:
    """{file name: {"size", "sha256"}} of the weight files in `d`, each checked (header, every tensor finite)
    first: recorded in a model dir's tunelab.json, so that a later load verifies the hash instead."""
    out = {}
    for p in sorted(Path(d).glob("*.safetensors")):
        check_weights(p)
        out[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out
