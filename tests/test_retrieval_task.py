"""The retrieval task: pairs prepared from aliased columns, the contrastive loss and its masks, mined hard negatives,
a MiniLM fine-tune that beats its base, and its model dir used as an index encoder and scored by `tunelab eval`."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tunelab.config import PrepareOptions, validate
from tunelab.data.dataset import load_split
from tunelab.data.prepare import prepare
from tunelab.models import load_tokenizer, tiny_model_dir

NAMES = ["alice", "bruno", "chen", "dara", "emil", "farah"]
FRUITS = ["banana", "cherry", "mango", "plum", "kiwi", "lemon", "grape", "peach", "apricot", "melon", "papaya",
          "guava", "lime", "fig", "date", "olive", "quince", "pear", "apple", "orange", "coconut", "lychee", "berry",
          "walnut"]
ANIMALS = ["tiger", "otter", "falcon", "badger", "lizard", "walrus", "beaver", "heron", "jackal", "lemur", "moose",
           "panda", "raven", "salmon", "toucan", "viper", "weasel", "yak", "zebra", "camel", "dingo", "eagle",
           "ferret", "gecko"]


def write_pairs(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return path


def pet_pairs() -> list[dict]:
    """Who keeps which pet, asked by the fruit the pet eats: an arbitrary fruit -> animal map the base encoder
    cannot know, learnable from the other owners' pairs (each fruit appears once per owner)."""
    animals = ANIMALS[:]
    random.Random(0).shuffle(animals)
    return [{"question": f"which pet does {n} keep who eats {f}?", "answer": f"{n} keeps a {a}."}
            for n in NAMES for f, a in zip(FRUITS, animals)]


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pets")
    src = write_pairs(root / "pets.csv", pet_pairs(), ["question", "answer"])
    # near-duplicate queries are grouped, and these templated ones would all be one group: compared exactly only
    prepare(str(src), root / "ds", PrepareOptions(task="retrieval", val_ratio=0.25, test_ratio=0.2,
                                                  dedup={"near": False}))
    return root / "ds"


@pytest.fixture(scope="module")
def trained(pets, tmp_path_factory) -> Path:
    """MiniLM fine-tuned on the pet pairs (3 epochs, seed 0, ~10 s on two cores)."""
    from tunelab.train.loop import train

    cfg = validate({"model": {"base": "builtin:minilm-l6", "max_length": 32}, "data": {"dir": str(pets)},
                    "method": {"name": "full"},
                    "train": {"epochs": 3, "batch_size": 16, "lr": 1e-4, "seed": 0, "precision": "fp32",
                              "tracking": []}, "eval": {"bootstrap": 200}})
    run = tmp_path_factory.mktemp("pets-run") / "run"
    train(cfg, run, show_progress=False)
    return run / "model"


def test_prepare_reads_aliased_pairs_rejects_empty_ones_and_keeps_a_query_in_one_split(tmp_path):
    rng = random.Random(3)
    words = ["reset", "device", "router", "password", "invoice", "refund", "screen", "battery", "cable", "account",
             "order", "parcel", "printer", "update", "login", "charge"]
    rows = [{"question": f"{' '.join(rng.sample(words, 4))} {i}?", "answer": f"Answer number {i}.",
             "negative": f"Not answer {i}."} for i in range(30)]
    rows += [{"question": rows[3]["question"], "answer": "Another answer to the third question.", "negative": ""},
             {"question": rows[4]["question"].upper(), "answer": "", "negative": ""},  # rejected: no passage
             dict(rows[7])]  # the same pair again: a duplicate
    src = write_pairs(tmp_path / "faq.csv", rows, ["question", "answer", "negative"])
    meta = prepare(str(src), tmp_path / "ds", PrepareOptions(task="retrieval", val_ratio=0.2, test_ratio=0.2))
    assert meta["task"] == "retrieval" and meta["fields"] == ["query", "passage"]
    assert meta["report"]["dropped"] == {"empty_passage": 1, "duplicate": 1}
    rejected = [json.loads(line) for line in (tmp_path / "ds" / "rejected.jsonl").read_text().splitlines()]
    assert {(r["line"], r["reason"]) for r in rejected} == {(33, "empty_passage"), (34, "duplicate")}
    assert rejected[0]["text"] == rows[4]["question"].upper()
    splits = {s: load_split(tmp_path / "ds", s) for s in ("train", "validation", "test")}
    assert sum(map(len, splits.values())) == 31 and all(splits.values())
    where = [s for s, split in splits.items() for r in split if r["query"] == rows[3]["question"]]
    assert len(where) == 2 and len(set(where)) == 1  # both passages of the query on one side
    row = next(r for split in splits.values() for r in split if r["query"] == rows[9]["question"])
    assert row == {"query": rows[9]["question"], "passage": "Answer number 9.", "negatives": ["Not answer 9."]}
    # JSON lines with anchor / positive / negatives (a list) read the same way
    lines = [{"anchor": f"q{i} colour?", "positive": f"q{i} is red", "negatives": [f"q{i} is blue", ""]}
             for i in range(10)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(map(json.dumps, lines)))
    meta = prepare(str(tmp_path / "pairs.jsonl"), tmp_path / "ds2", PrepareOptions(task="retrieval"))
    assert meta["report"]["rows_kept"] == 10
    assert load_split(tmp_path / "ds2", "train")[0]["negatives"] == [load_split(tmp_path / "ds2", "train")[0][
        "passage"].replace("red", "blue")]


def test_duplicate_and_co_relevant_passages_are_no_negatives():
    from tunelab.tasks.retrieval import RetrievalTask, contrastive_loss

    task = RetrievalTask(load_tokenizer(str(tiny_model_dir("tiny-bert"))), 32)
    enc = task.encode([{"query": "a?", "passage": "same answer"}, {"query": "b?", "passage": "same answer"},
                       {"query": "c?", "passage": "c one"}, {"query": "c?", "passage": "c two"},
                       {"query": "d?", "passage": "d", "negatives": ["same answer", "d wrong"]}])
    batch = task.collate(enc, [0, 1, 2, 3, 4])
    # candidates: the five positives (two of them one text, each text once), then the new negative "d wrong"
    assert batch["passage_ids"].shape[0] == 6
    expected = torch.zeros((5, 6), dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = True  # the same passage text in two pairs
    expected[2, 3] = expected[3, 2] = True  # another passage of the same query
    assert torch.equal(batch["exclude"], expected)
    q = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    p = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    p[1] = p[0]
    loss = contrastive_loss(q, p, batch["exclude"], 20.0)
    manual = 0.0
    for i in range(5):
        keep = [j for j in range(6) if not expected[i, j]]
        manual += -torch.log_softmax(20.0 * q[i] @ p[keep].T, 0)[keep.index(i)]
    assert torch.allclose(loss, manual, atol=1e-5)
    unmasked = contrastive_loss(q, p, torch.zeros_like(expected), 20.0)
    assert unmasked > loss  # the duplicate competed with the positive
    # two wordings of one question (case, spacing) share their relevant passages
    enc = task.encode([{"query": "How do I X?", "passage": "one way"}, {"query": "how do i  x?", "passage": "another"},
                       {"query": "Why?", "passage": "because"}])
    assert torch.equal(task.collate(enc, [0, 1, 2])["exclude"],
                       torch.tensor([[False, True, False], [True, False, False], [False, False, False]]))


def test_mined_hard_negatives_are_not_the_positive_and_are_deterministic():
    from transformers import AutoModel

    from tunelab.tasks.retrieval import RetrievalTask

    model = AutoModel.from_pretrained(tiny_model_dir("tiny-bert"))
    tok = load_tokenizer(str(tiny_model_dir("tiny-bert")))
    rows = [{"query": f"{n} eats {f}", "passage": f"{n} keeps a {a}"}
            for n in NAMES[:3] for f, a in zip(FRUITS[:6], ANIMALS[:6])]
    rows.append({"query": "alice eats banana", "passage": "ALICE keeps  a tiger"})  # the positive, other case
    task = RetrievalTask(tok, 32, hard_negatives=2)
    assert task.mine(model, rows) == 2 * 18
    first = dict(task.mined)
    for r in rows:
        mined = task.mined[r["query"]]
        relevant = {x["passage"].casefold().replace("  ", " ") for x in rows if x["query"] == r["query"]}
        assert len(mined) == 2 and not relevant & {m.casefold() for m in mined}
    task.mine(model, rows)
    assert task.mined == first
    enc = task.encode(rows[:2])
    batch = task.collate(enc, [0, 1])
    assert batch["passage_ids"].shape[0] > 2  # the mined negatives join the batch


def test_training_beats_the_base_and_the_model_dir_is_an_index_encoder(trained, pets, tmp_path):
    from transformers import AutoModel

    from tunelab.models import load_model_dir, load_pretrained, read_meta, resolve_base
    from tunelab.rag.index import Encoder, Index
    from tunelab.serve.registry import parse_spec
    from tunelab.tasks.retrieval import RetrievalTask

    meta = read_meta(trained)
    assert meta["task"] == "retrieval" and (trained / "model.safetensors").is_file()
    task = RetrievalTask(load_tokenizer("builtin:minilm-l6"), 32)
    base = load_pretrained(AutoModel, resolve_base("builtin:minilm-l6"))
    before = task.evaluate(base, task.encode(load_split(pets, "validation")), 64)["mrr@10"]
    assert meta["metrics"]["validation"]["mrr@10"] > before + 0.15
    # the index's encoder embeds as training did: the same pooling, the same vectors
    encoder = Encoder(str(trained))
    assert encoder.max_length == meta["max_length"] == 32  # as the model was trained
    model, tok, _ = load_model_dir(trained)
    texts = ["alice keeps a tiger.", "which pet does chen keep who eats mango?"]
    ours = RetrievalTask(tok, 32).embed_tokens(model, tok(texts)["input_ids"], 8).numpy()
    np.testing.assert_allclose(encoder(texts), ours, atol=1e-5)
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "pets.md").write_text("# Pets\n\nalice keeps a tiger.\n\n# Fruit\n\nbruno eats a plum.\n")
    index, summary = Index.build([tmp_path / "kb"], tmp_path / "index", encoder)
    assert summary["chunks"] >= 1 and index.search("who keeps a tiger?", k=1)
    assert parse_spec(str(trained)).kind == "embed"  # `tunelab serve` answers /v1/embeddings with it


def test_eval_writes_the_retrieval_report(trained, tmp_path):
    from tunelab.evaluate.report import evaluate, print_report
    from tunelab.terminal import make_console

    report = evaluate(trained, out=tmp_path / "report.json")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["task"] == "retrieval" and saved["n"] == saved["passages"] > 0
    assert set(saved["baselines"]) == {"base", "bm25"}
    for key in ("mrr@10", "recall@1", "recall@5", "recall@10"):
        assert 0 <= saved[key] <= 1 and 0 <= saved["baselines"]["bm25"][key] <= 1
    assert report["mrr@10"] > report["baselines"]["base"]["mrr@10"] + 0.15
    assert report["comparisons"]["base"]["mrr@10"]["verdict"] == "better"
    assert report["intervals"]["mrr@10"][0] <= report["mrr@10"] <= report["intervals"]["mrr@10"][1]
    assert report["warnings"] == []
    out = io.StringIO()
    print_report(report, make_console(file=out))
    assert "MRR@10" in out.getvalue() and "beats BM25" in out.getvalue()


def test_lora_trains_only_adapters_and_loads_as_an_encoder(tmp_path):
    from tunelab.rag.index import Encoder
    from tunelab.train.loop import train

    rows = [{"query": f"{n} eats {f}", "answer": f"{n} keeps a {a}"}
            for n in NAMES[:4] for f, a in zip(FRUITS[:10], ANIMALS[:10])]
    src = write_pairs(tmp_path / "p.csv", rows, ["query", "answer"])
    prepare(str(src), tmp_path / "ds", PrepareOptions(task="retrieval", dedup={"near": False}))
    cfg = validate({"model": {"base": "tiny-bert", "max_length": 16, "retrieval": {"hard_negatives": 1}},
                    "data": {"dir": str(tmp_path / "ds")}, "method": {"name": "lora", "lora": {"r": 4}},
                    "train": {"epochs": 2, "batch_size": 8, "lr": 5e-3, "seed": 0, "precision": "fp32",
                              "tracking": []}})
    result = train(cfg, tmp_path / "run", show_progress=False)
    model_dir = Path(result["model_dir"])
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter["task_type"] == "FEATURE_EXTRACTION" and not adapter.get("modules_to_save")
    assert json.loads((model_dir / "tunelab.json").read_text())["retrieval"]["mined"] > 0
    vectors = Encoder(str(model_dir), max_length=16)(["alice eats banana"])
    assert vectors.shape[0] == 1 and abs(float(np.linalg.norm(vectors[0])) - 1) < 1e-5


def test_evaluation_in_blocks_of_queries_equals_the_whole_matrix(monkeypatch):
    from transformers import AutoModel

    import tunelab.tasks.retrieval as retrieval
    from tunelab.models import load_pretrained, resolve_base

    task = retrieval.RetrievalTask(load_tokenizer(str(tiny_model_dir("tiny-bert"))), 32)
    enc = task.encode([{"query": f"q{i} alpha {i % 7}", "passage": f"p{i} beta {i % 5} gamma"} for i in range(60)])
    model = load_pretrained(AutoModel, resolve_base("tiny-bert"))
    whole = task.evaluate(model, enc, 16, per_query=True)
    monkeypatch.setattr(retrieval, "EVAL_CELLS", 60 * 7)  # blocks of 7 queries against the 60 passages
    blocks = task.evaluate(model, enc, 16, per_query=True)
    assert blocks["reciprocal_ranks"] == whole["reciprocal_ranks"] and blocks["queries"] == 60
    for key in ("mrr@10", "recall@1", "recall@5", "recall@10", "loss"):
        assert blocks[key] == pytest.approx(whole[key], abs=1e-6)
    assert task.evaluate(model, task.encode([]), 16)["mrr@10"] == 0.0
