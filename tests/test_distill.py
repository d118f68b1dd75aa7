"""`train.distill`: the student learns the teacher's soft labels beside the gold ones."""

import copy

import pytest
import torch

from tunelab.config import DistillConfig
from tunelab.data.dataset import load_split
from tunelab.errors import UserError
from tunelab.models import load_model_dir, read_meta
from tunelab.tasks import task_spec
from tunelab.tasks.classification import ClassificationTask
from tunelab.tasks.token_classification import TokenClassificationTask
from tunelab.train.distill import Distilled, distilled


def _batch(task, model_dir, n=6):
    rows = load_split(read_meta(model_dir)["data"]["path"], "train")[:n]
    enc = task.encode(rows)
    return task.collate(enc, list(range(len(rows))))


@pytest.mark.parametrize("which", ["tiny_classifier", "tiny_ner"])
def test_the_soft_term_is_zero_against_itself_and_alpha_zero_is_the_task_loss(which, request):
    d = request.getfixturevalue(which)
    model, tok, meta = load_model_dir(d)
    kind = ClassificationTask if which == "tiny_classifier" else TokenClassificationTask
    task = kind(tok, meta["labels"], 64)
    batch = _batch(task, d)
    with torch.no_grad():
        hard = task.loss_sum(model, batch)
        assert torch.allclose(Distilled(task, copy.deepcopy(model), 2.0, 0.0).loss_sum(model, batch), hard)
        assert Distilled(task, copy.deepcopy(model), 2.0, 1.0).loss_sum(model, batch).abs() < 1e-4
        # a different teacher: a positive soft term, on the same loss terms as the task's
        other = copy.deepcopy(model)
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        assert Distilled(task, other, 2.0, 1.0).loss_sum(model, batch) > 1e-3


def test_a_teacher_must_share_the_task_labels_and_tokenizer(tiny_classifier, tiny_ner, sft_lora):
    model, tok, meta = load_model_dir(tiny_classifier)
    task = ClassificationTask(tok, meta["labels"], 64)
    spec = task_spec("classification")
    with pytest.raises(UserError, match="is a 'token_classification' model"):
        distilled(task, spec, DistillConfig(teacher=str(tiny_ner)), tok, "cpu")
    with pytest.raises(UserError, match="labels"):
        distilled(ClassificationTask(tok, list(reversed(meta["labels"])), 64), spec,
                  DistillConfig(teacher=str(tiny_classifier)), tok, "cpu")
    with pytest.raises(UserError, match="is a 'sft' model"):
        distilled(task, spec, DistillConfig(teacher=str(sft_lora)), tok, "cpu")
    with pytest.raises(UserError, match="another tokenizer"):  # token-level KD: the vocabularies must match
        distilled(task, task_spec("sft"), DistillConfig(teacher=str(sft_lora)), tok, "cpu")
    with pytest.raises(UserError, match="needs a causal_lm or sft model"):
        distilled(task, task_spec("sft"), DistillConfig(teacher=str(tiny_classifier)), tok, "cpu")
    ok = distilled(task, spec, DistillConfig(teacher=str(tiny_classifier)), tok, "cpu")
    assert ok.metric == task.metric and not any(p.requires_grad for p in ok.teacher.parameters())


def test_a_student_trains_with_a_teacher(tmp_path, small_dataset, tiny_classifier):
    from conftest import tiny_config

    from tunelab.config import validate
    from tunelab.train.loop import train

    cfg = tiny_config(small_dataset, epochs=2, distill={"teacher": str(tiny_classifier), "alpha": 0.7})
    result = train(validate(cfg), tmp_path / "student", show_progress=False)
    assert (tmp_path / "student" / "model" / "tunelab.json").is_file() and result


def _lm_batch(task, data_dir, n=8):
    enc = task.encode(load_split(data_dir, "train")[:n])
    return task.collate(enc, list(range(len(enc))))


def _reference(student, teacher, batch, t, alpha):
    """The mixed loss from both models' whole logits, the plain way."""
    kw = {k: batch.get(k) for k in ("input_ids", "attention_mask", "position_ids")}
    where = batch["targets"] != -100
    s = student(**kw).logits[where].float()
    with torch.no_grad():
        q = teacher(**kw).logits[where].float()
    hard = torch.nn.functional.cross_entropy(s, batch["targets"][where], reduction="sum")
    soft = torch.nn.functional.kl_div(torch.log_softmax(s / t, -1), torch.log_softmax(q / t, -1), log_target=True,
                                      reduction="sum") * t * t
    return (1 - alpha) * hard + alpha * soft


@pytest.mark.parametrize("packing", [True, False])
def test_token_level_kd_matches_the_whole_logits_loss_and_its_gradients(packing, peaky_llama, chat_data):
    from transformers import AutoModelForCausalLM

    from tunelab.models import load_tokenizer
    from tunelab.tasks.sft import SFTTask
    from tunelab.train.distill import TokenDistilled

    tok = load_tokenizer("builtin:smollm2-135m-instruct")
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(peaky_llama)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False).add_(torch.randn_like(p) * 0.2)
    task = SFTTask(tok, 64, packing=packing)
    batch = _lm_batch(task, chat_data)
    kd = TokenDistilled(task, teacher, 2.0, 0.7, len(tok))
    for chunk_path in (True, False):  # the chunked loss, and through the model's forward (prompt learning, FSDP)
        task.through_forward = not chunk_path
        mine = kd.loss_sum(student, batch)
        grad = torch.autograd.grad(mine, student.model.embed_tokens.weight)[0]
        ref = _reference(student, teacher, batch, 2.0, 0.7)
        ref_grad = torch.autograd.grad(ref, student.model.embed_tokens.weight)[0]
        assert mine.item() == pytest.approx(ref.item(), rel=1e-4)
        assert torch.allclose(grad, ref_grad, rtol=1e-3, atol=1e-5)
    task.through_forward = False
    with torch.no_grad():
        assert torch.allclose(TokenDistilled(task, teacher, 2.0, 0.0, len(tok)).loss_sum(student, batch),
                              task.loss_sum(student, batch), rtol=1e-5)
        itself = TokenDistilled(task, copy.deepcopy(student), 2.0, 1.0, len(tok)).loss_sum(student, batch)
        assert itself.abs() < 1e-3


def test_a_scratch_decoder_learns_from_a_chat_model_with_its_tokenizer(tmp_path, chat_data, sft_lora):
    """The token-level chain end to end: a new 1-layer decoder on the teacher's tokenizer, trained on the teacher's
    soft labels alone (alpha 1), ends closer to the teacher than the same decoder trained on the gold alone."""
    from conftest import task_config

    from tunelab.config import validate
    from tunelab.tasks.sft import SFTTask
    from tunelab.train.distill import TokenDistilled
    from tunelab.train.loop import train

    def student(alpha, name):
        cfg = task_config(chat_data, "scratch", epochs=3, distill={"teacher": str(sft_lora), "alpha": alpha,
                                                                   "temperature": 1.0}).model_dump()
        cfg["model"]["scratch"] = {"tokenizer": str(sft_lora), "hidden_size": 32, "layers": 1, "heads": 2}
        train(validate(cfg), tmp_path / name, show_progress=False)
        return load_model_dir(tmp_path / name / "model")

    teacher, tok, _ = load_model_dir(sft_lora)
    (kd, kd_tok, meta), (gold, _, _) = student(1.0, "kd"), student(0.0, "gold")
    assert kd_tok.get_vocab() == tok.get_vocab() and meta["base"]["ref"] == "scratch"
    task = SFTTask(tok, 64)
    batch = _lm_batch(task, chat_data, n=32)
    with torch.no_grad():
        kl = {name: TokenDistilled(task, teacher, 1.0, 1.0, len(tok)).loss_sum(m, batch).item()
              for name, m in (("kd", kd), ("gold", gold))}
    assert kl["kd"] < 0.8 * kl["gold"], kl
