"""Masked language modelling (domain-adaptive pretraining of encoders): BERT's masking recipe, the loss on the
masked positions, a run on tiny-bert whose model dir is the base of a classifier, and the commands that refuse a
stage's model dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import task_config
from tunelab.errors import UserError
from tunelab.tasks.causal_lm import IGNORE
from tunelab.tasks.masked_lm import MaskedLMTask

WORDS = ("the market opened higher and shares of unbelievably hyperparameterised tokenisation companies rose on "
         "strong demand while regulators deliberated").split()


@pytest.fixture(scope="module")
def tok():
    from tunelab.models import load_tokenizer

    return load_tokenizer("tiny-bert")


def docs(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"text": " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(n_words),), generator=g))}
            for n_words in torch.randint(5, 40, (n,), generator=g)]


def batch_of(task, enc):
    return task.collate(enc, list(range(len(enc))))


def test_encoding_frames_blocks_and_marks_special_tokens(tok):
    rows = docs(30)
    packed = MaskedLMTask(tok, 32).encode(rows)
    assert all(len(x) == 32 for x in packed.input_ids[:-1]) and len(packed.input_ids[-1]) <= 32
    for ids, words in zip(packed.input_ids, packed.words):
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert all((w < 0) == (t in tok.all_special_ids) for t, w in zip(ids, words))
    single = MaskedLMTask(tok, 16, packing=False).encode(rows)
    assert len(single) == len(rows) and max(single.lengths) == 16
    assert single.input_ids[0][1:-1] == tok(rows[0]["text"], add_special_tokens=False)["input_ids"][:14]


def test_masking_rate_split_and_special_tokens(tok):
    task = MaskedLMTask(tok, 64, seed=3)
    enc = task.encode(docs(400))
    chosen = masked = kept = candidates = 0
    for _ in range(3):  # dynamic: every batching draws afresh
        b = batch_of(task, enc)
        orig = torch.full_like(b["input_ids"], tok.pad_token_id)
        for r, ids in enumerate(enc.input_ids):
            orig[r, :len(ids)] = torch.as_tensor(ids)
        special = torch.isin(orig, torch.tensor(tok.all_special_ids))  # [CLS], [SEP], padding
        sel = b["targets"] != IGNORE
        assert not (sel & special).any(), "a special token or padding was chosen"
        assert torch.equal(b["targets"][sel], orig[sel]), "targets are the original ids"
        assert torch.equal(b["input_ids"][~sel], orig[~sel]), "only chosen positions change"
        chosen += int(sel.sum())
        candidates += int((~special).sum())
        masked += int((b["input_ids"][sel] == tok.mask_token_id).sum())
        kept += int((b["input_ids"][sel] == orig[sel]).sum())
    assert 0.13 < chosen / candidates < 0.17
    assert 0.77 < masked / chosen < 0.83
    assert 0.08 < kept / chosen < 0.12  # a random replacement equal to the original is rare (1 in ~30k)
    assert 0.08 < (chosen - masked - kept) / chosen < 0.12


def test_whole_word_masking_masks_all_pieces_of_a_word(tok):
    task = MaskedLMTask(tok, 64, whole_word=True, seed=1)
    enc = task.encode(docs(200))
    assert any(w >= 0 and row.count(w) > 1 for row in enc.words for w in row), "no word of several pieces"
    b = batch_of(task, enc)
    pieces_chosen, total = 0, 0
    for r, words in enumerate(enc.words):
        sel = (b["targets"][r, :len(words)] != IGNORE).tolist()
        for w in set(words) - {-1}:
            picks = {sel[j] for j, x in enumerate(words) if x == w}
            assert len(picks) == 1, f"word {w} of row {r} is masked in part"
            pieces_chosen += sum(sel[j] for j, x in enumerate(words) if x == w)
        total += sum(1 for w in words if w >= 0)
    assert 0.10 < pieces_chosen / total < 0.22


def test_same_seed_same_masks_and_fixed_eval_masks(tok):
    rows = docs(50)
    a, b, c = MaskedLMTask(tok, 32, seed=7), MaskedLMTask(tok, 32, seed=7), MaskedLMTask(tok, 32, seed=8)
    ea, eb, ec = a.encode(rows), b.encode(rows), c.encode(rows)
    first, second = batch_of(a, ea), batch_of(b, eb)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["targets"], batch_of(c, ec)["targets"])
    assert not torch.equal(first["targets"], batch_of(a, ea)["targets"]), "training masks are drawn afresh"
    # units draws the masks the next collate uses: the count normalises exactly the targets trained on
    idx = [0, 3, 5]
    n = a.units(ea, idx)
    assert n == int((a.collate(ea, idx)["targets"] != IGNORE).sum())
    fixed = [t.clone() for _, t in a.fixed_masks(ea)]
    assert all(torch.equal(x, t) for x, (_, t) in zip(fixed, a.fixed_masks(ea)))
    assert all(torch.equal(x, t) for x, (_, t) in zip(fixed, b.fixed_masks(b.encode(rows))))


@pytest.fixture(scope="module")
def tiny_mlm():
    from tunelab.models import load_masked_lm

    torch.manual_seed(0)
    model, tok, _, new = load_masked_lm("tiny-bert")
    return model.eval(), tok, new


def test_load_masked_lm_new_head_tied_to_embeddings(tiny_mlm):
    model, _, new = tiny_mlm
    assert new and all(n.startswith("cls.predictions.") for n in new)
    assert not any("decoder.weight" in n for n in new)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_loss_equals_full_logits_reference_and_eval_is_fixed(tiny_mlm):
    model, tok, _ = tiny_mlm
    task = MaskedLMTask(tok, 24, seed=0)
    enc = task.encode(docs(12))
    b = batch_of(task, enc)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ref = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), ignore_index=-100, reduction="sum")
        got = task.loss_sum(model, b)
        task.through_model_forward()
        via_forward = task.loss_sum(model, b)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=1e-5) and torch.allclose(via_forward, ref, rtol=1e-5)
    first, second = task.evaluate(model, enc, 4), task.evaluate(model, enc, 5)
    assert first == pytest.approx(second) and 0 <= first["accuracy"] <= 1 and first["tokens"] > 0


def _train(cfg, out: Path):
    from tunelab.train.loop import train

    return train(cfg, out, show_progress=False)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory, text_data) -> Path:
    cfg = task_config(text_data, "tiny-bert", epochs=2, lr=1e-3)
    cfg.task = "masked_lm"
    return Path(_train(cfg, tmp_path_factory.mktemp("mlm") / "run")["model_dir"])


def test_masked_lm_run_writes_a_stage_model_dir(mlm_dir):
    from tunelab.models import read_meta

    meta = read_meta(mlm_dir)
    assert meta["task"] == "masked_lm" and meta["labels"] == []
    assert meta["mlm"] == {"probability": 0.15, "whole_word": False, "packing": True}
    v = meta["metrics"]["validation"]
    assert v["perplexity"] > 1 and 0 <= v["accuracy"] <= 1


def test_classifier_fine_tuned_from_the_masked_lm_model_dir(mlm_dir, small_dataset, tmp_path):
    from transformers import AutoModelForMaskedLM

    from tunelab.models import load_classifier

    mlm = AutoModelForMaskedLM.from_pretrained(mlm_dir)
    clf, _, base, new = load_classifier(str(mlm_dir), ["negative", "neutral", "positive"])
    body = dict(clf.bert.named_parameters())
    for name, p in mlm.bert.named_parameters():
        assert torch.equal(p, body[name]), name
    assert base.parent["task"] == "masked_lm"
    assert any(n.startswith("classifier.") for n in new)
    cfg = task_config(small_dataset, str(mlm_dir), epochs=1)
    cfg.task = "classification"
    summary = _train(cfg, tmp_path / "clf")
    from tunelab.models import read_meta

    meta = read_meta(summary["model_dir"])
    assert meta["task"] == "classification" and meta["base"]["parent"]["task"] == "masked_lm"


def test_lora_masked_lm_trains_the_head_not_a_copy_of_the_embeddings(text_data, tmp_path):
    from tunelab.evaluate.report import evaluate
    from tunelab.models import load_model_dir, resolve_base

    cfg = task_config(text_data, "tiny-bert", method="lora", epochs=1, lr=1e-3)
    cfg.task = "masked_lm"
    out = Path(_train(cfg, tmp_path / "lora")["model_dir"])
    assert (out / "adapter_config.json").is_file()
    model, _, meta = load_model_dir(out)
    names = [n for n, _ in model.named_parameters()]
    assert any("lora_" in n for n in names)
    assert any("modules_to_save" in n and "transform" in n for n in names)
    assert not any("modules_to_save" in n and "decoder" in n for n in names)
    report = evaluate(out, split="validation")
    assert report["perplexity"] == pytest.approx(meta["metrics"]["validation"]["perplexity"], rel=1e-4)
    assert (Path(resolve_base(str(out)).path) / "config.json").is_file()  # merged: the base of another run


def test_eval_reports_masked_token_scores(mlm_dir, capsys):
    from tunelab.evaluate.report import evaluate, print_report

    report = evaluate(mlm_dir)
    assert report["task"] == "masked_lm" and report["data"]["split"] == "test"
    assert report["perplexity"] > 1 and 0 <= report["accuracy"] <= 1 and report["tokens"] > 0
    assert report["warnings"] == []
    assert evaluate(mlm_dir)["perplexity"] == report["perplexity"]  # fixed masks: the same score twice
    lo, hi = report["intervals"]["perplexity"]
    assert lo <= report["perplexity"] <= hi and report["statistics"]["unit"] == "row" and "blocks" not in report
    batched = evaluate(mlm_dir, overrides={"bootstrap": 0})  # one forward per row or per batch: the same score
    assert batched["perplexity"] == pytest.approx(report["perplexity"], rel=1e-5) and "intervals" not in batched
    print_report(report)
    printed = capsys.readouterr().out
    assert "masked tokens" in printed and "perplexity 95% CI" in printed


def test_serve_predict_generate_export_compress_refuse_a_stage(mlm_dir, tmp_path):
    from tunelab.export import export_model
    from tunelab.export.quantize import compress_int8
    from tunelab.generate import load_generator
    from tunelab.predict import predict_texts
    from tunelab.serve.registry import parse_spec

    calls = [lambda: parse_spec(str(mlm_dir)), lambda: predict_texts(mlm_dir, ["hello"]),
             lambda: load_generator(str(mlm_dir), "cpu"), lambda: export_model(mlm_dir, tmp_path / "x", "hf"),
             lambda: compress_int8(mlm_dir, tmp_path / "q")]
    for call in calls:
        with pytest.raises(UserError, match="masked_lm model dir, a stage.*model.base"):
            call()


def test_task_choice_on_text_and_encoder_bases(text_data, small_dataset):
    from tunelab.train.loop import resolve_task
    from tunelab.data.dataset import load_meta

    cfg = task_config(text_data, "tiny-bert")
    with pytest.raises(UserError, match="encoder.*task: masked_lm"):
        resolve_task(cfg, load_meta(text_data), text_data)  # auto on text means causal_lm
    assert resolve_task(task_config(text_data, "tiny-llama"), load_meta(text_data), text_data) == "causal_lm"
    cfg.task = "masked_lm"
    assert resolve_task(cfg, load_meta(text_data), text_data) == "masked_lm"
    with pytest.raises(UserError, match="'classification' dataset, which trains task classification"):
        resolve_task(cfg, load_meta(small_dataset), small_dataset)


def test_example_configs_validate_and_a_tiny_dapt_chain_runs(small_dataset, tmp_path):
    """The two examples validate; their chain (the classification train split's texts as a text dataset, masked
    LM on it, the classifier from its model dir) runs at tiny size."""
    from tunelab.config import PrepareOptions, load_config
    from tunelab.data.prepare import prepare

    root = Path(__file__).parent.parent / "examples"
    dapt, then = load_config(root / "dapt-minilm.yaml"), load_config(root / "dapt-then-classify.yaml")
    assert dapt.task == "masked_lm" and dapt.data.prepare.task == "text"
    assert then.model.base == str((root / "../runs/dapt-minilm/model").resolve())
    text = tmp_path / "text"
    prepare(str(small_dataset / "train.jsonl"), text, PrepareOptions(task="text", dedup={"near": False}))
    cfg = task_config(text, "tiny-bert", epochs=1, max_steps=3)
    cfg.task, cfg.model.mlm.whole_word = "masked_lm", True
    mlm = _train(cfg, tmp_path / "dapt")["model_dir"]
    clf = task_config(small_dataset, str(mlm), max_steps=2)
    assert Path(_train(clf, tmp_path / "then")["model_dir"]).is_dir()


def test_prompt_learning_and_scratch_are_refused(text_data, tmp_path):
    cfg = task_config(text_data, "tiny-bert", method="prompt")
    cfg.task = "masked_lm"
    with pytest.raises(UserError, match="virtual tokens"):
        _train(cfg, tmp_path / "p")
    cfg = task_config(text_data, "scratch")
    cfg.task = "masked_lm"
    with pytest.raises(UserError, match="scratch builds decoders only"):
        _train(cfg, tmp_path / "s")
