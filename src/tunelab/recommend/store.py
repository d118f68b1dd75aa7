"""The recommender dir (kind "recommender"): everything needed to recommend without the interactions dir.

- `tunelab.json`: kind, model name, params (a hybrid's members and weights, a ranker's first stage), the data it
  was fitted on (path, fingerprint, splits), validation and search records;
- `items.jsonl`: the catalogue (id, title, text, categories, cold) in index order;
- `users.json`: user ids in index order; `history.npz`: each user's history in time order (CSR: indptr, items);
- `state.npz`: the model's arrays; `ranker/`: a ranker's fine-tuned classifier (a tunelab model dir).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelab.artifacts import META_FILE, kind_of, write_folder
from tunelab.data.dataset import write_jsonl
from tunelab.errors import UserError, read_json_file
from tunelab.recommend.data import Interactions
from tunelab.recommend.hybrid import Hybrid
from tunelab.recommend.models import Catalogue, Recommender, simple

KIND = "recommender"


def build(name: str, params: dict, folder: Path | None = None) -> Recommender:
    """An unfitted model from its name and params (a hybrid's members and a ranker's stages included)."""
    if name == "hybrid":
        return Hybrid([build(m["name"], m["params"]) for m in params["members"]], params["weights"])
    if name == "ranker":
        from tunelab.recommend.ranker import TwoStage  # imported inside: it loads torch

        return TwoStage(build(params["stage1"]["name"], params["stage1"]["params"]), params, folder)
    return simple(name, params)


def save(model: Recommender, out: str | Path, data: Interactions, fit_on: tuple[str, ...], record: dict,
         overwrite: bool = False, extra=None) -> dict:
    """Write the recommender dir; `extra(tmp)` adds files (a ranker's classifier). Returns its `tunelab.json`."""
    histories = data.histories(*fit_on)
    meta = {"kind": KIND, "model": model.name, "params": model.params,
            "data": {"path": str(data.path.resolve()), "fingerprint": data.meta.get("fingerprint"),
                     "fit_on": list(fit_on)},
            "items": data.n_items, "users": data.n_users, **record}
    with write_folder(out, KIND, overwrite) as tmp:
        write_jsonl(tmp / "items.jsonl", data.items)
        (tmp / "users.json").write_text(json.dumps(data.users, ensure_ascii=False), encoding="utf-8")
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        np.savez(tmp / "history.npz", indptr=np.concatenate([[0], np.cumsum(lengths)]),
                 items=np.concatenate(histories) if histories else np.zeros(0, np.int64))
        np.savez(tmp / "state.npz", **model.arrays())
        if extra is not None:
            extra(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


@dataclass
class Loaded:
    """A recommender dir in memory."""

    path: Path
    meta: dict
    model: Recommender
    items: list[dict]
    item_index: dict[str, int]
    users: list[str]
    user_index: dict[str, int]
    histories: list[np.ndarray]
    catalogue: Catalogue

    @property
    def cold(self) -> np.ndarray:
        return np.array([bool(row.get("cold")) for row in self.items])


def read_meta(path: str | Path) -> dict:
    """A recommender dir's `tunelab.json`; another folder is a `UserError`."""
    path = Path(path)
    if kind_of(path) != KIND:
        raise UserError(f"{path} is not a recommender dir; create one with `tunelab recommend train`")
    return read_json_file(path / META_FILE, f"{path} has no {META_FILE}")


def load(path: str | Path) -> Loaded:
    path = Path(path)
    meta = read_meta(path)
    items = [json.loads(line) for line in (path / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    users = json.loads((path / "users.json").read_text(encoding="utf-8"))
    with np.load(path / "history.npz") as h:
        indptr, flat = h["indptr"], h["items"]
    with np.load(path / "state.npz") as state:
        arrays = {k: state[k] for k in state.files}
    catalogue = Catalogue.of(items)
    model = build(meta["model"], meta["params"], path)
    model.load_arrays(arrays, catalogue)
    return Loaded(path, meta, model, items, {row["item"]: k for k, row in enumerate(items)}, users,
                  {u: k for k, u in enumerate(users)}, [flat[indptr[u]:indptr[u + 1]] for u in range(len(users))],
                  catalogue)
