"""lm-evaluation-harness against `tunelab serve` in a subprocess, as a user runs it: `local-completions` for a
multiple-choice task (log-likelihoods from echoed prompt log-probabilities, prompts sent as token ids, several
per request and concurrently) and `local-chat-completions` for a generation task, both as local task files, the
tokenizer read from the model dir, offline, with an API key. What lm-eval records must be the model's own,
computed here in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serve_process import KEY, ServerProcess

LM_EVAL_TIMEOUT = 300  # seconds per lm-eval run (each takes ~15 s here)

MULTIPLE_CHOICE = [
    ("What colour is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten"], 1),
    ("Which one is a fruit?", ["carrot", "potato", "apple"], 2),
    ("水的化学式是什么？", ["H2O", "CO2", "NaCl"], 0),
    ("Which planet is closest to the sun?", ["Venus", "Mercury", "Mars"], 1),
    ("北京是哪个国家的首都？", ["日本", "中国", "韩国"], 1),
    ("What do bees make?", ["honey", "milk", "silk"], 0),
]
GENERATION = [("What is 2 plus 2?", "4"), ("Name a colour.", "blue"), ("你好吗？", "好"), ("Say hi.", "hi")]
UNTIL = "Q:"
MAX_GEN = 8


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """Two lm-eval task files over local JSON Lines data."""
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in MULTIPLE_CHOICE]
    (root / "mc.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    rows = [{"question": q, "answer": a} for q, a in GENERATION]
    (root / "gen.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (root / "tunelab_mc.yaml").write_text(
        "task: tunelab_mc\n" + common.format(data=root / "mc.jsonl") +
        'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
    (root / "tunelab_gen.yaml").write_text(
        "task: tunelab_gen\n" + common.format(data=root / "gen.jsonl") +
        'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        f'generation_kwargs:\n  until: ["{UNTIL}"]\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n'
        "  temperature: 0\nmetric_list:\n  - metric: exact_match\n")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, peaky_llama):
    log = tmp_path_factory.mktemp("lm-eval-serve") / "server.log"
    # no rate limit: lm-eval's remote tokenizer sends one request per text; fp32: the scores are compared with the
    # fp32 model's own to 5e-3 (bf16 decoding, the default where native, is measured in tests/test_serve_precision.py)
    srv = ServerProcess([f"peaky={peaky_llama}", "--max-batch", "4", "--rate-limit", "0", "--precision", "fp32"], log,
                        env={"TUNELAB_API_KEYS": KEY})
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def lm(peaky_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(peaky_llama, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(peaky_llama)


def lm_eval(out: Path, *args: str) -> tuple[list[dict], str]:
    """Run the lm_eval CLI offline (bounded in time) -> the samples it logged, and its log."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OPENAI_API_KEY": KEY, "HF_DATASETS_CACHE": str(out / "datasets-cache")}
    run = subprocess.run([sys.executable, "-m", "lm_eval", *args, "--output_path", str(out), "--log_samples"],
                         capture_output=True, text=True, env=env, timeout=LM_EVAL_TIMEOUT)
    assert run.returncode == 0, run.stderr[-4000:]
    files = sorted(out.rglob("samples_*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text(encoding="utf-8").splitlines()], run.stderr


@pytest.mark.parametrize("tokenizer", ["model-dir", "server"])
def test_multiple_choice_through_local_completions_scores_what_the_model_does(server, tasks, lm, peaky_llama,
                                                                              tmp_path, tokenizer):
    # the model dir's tokenizer files, or the server's /tokenizer_info and /tokenize (lm-eval finds them itself)
    backend = f"tokenizer={peaky_llama},tokenizer_backend=huggingface" if tokenizer == "model-dir" else \
        f"auth_token={KEY}"
    samples, log = lm_eval(tmp_path, "--model", "local-completions", "--model_args",
                           f"model=peaky,base_url={server.url}/v1/completions,{backend},num_concurrent=2,"
                           "max_retries=1",
                           "--batch_size", "4", "--include_path", str(tasks), "--tasks", "tunelab_mc")
    assert ("Using remote tokenizer" in log) == (tokenizer == "server")
    assert len(samples) == len(MULTIPLE_CHOICE)
    model, tok = lm

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    checked, accuracy = 0, []
    for sample in samples:
        scores = []
        for k, (args, resp) in enumerate(zip(sample["arguments"].values(), sample["resps"])):
            context, continuation = args["arg_0"], args["arg_1"]
            whole, ctx = encode(context + continuation), encode(context)  # lm-eval's split of the pair
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            targets = whole[len(ctx):]
            rows = logprobs[len(ctx) - 1:len(whole) - 1]
            want = float(sum(rows[i, t] for i, t in enumerate(targets)))
            greedy = all(int(rows[i].argmax()) == t for i, t in enumerate(targets))
            got, got_greedy = float(resp[0][0]), resp[0][1] in (True, "True")
            assert got == pytest.approx(want, abs=5e-3), (context, continuation)
            assert got_greedy == greedy
            scores.append(want)
            checked += 1
        accuracy.append(float(max(range(len(scores)), key=scores.__getitem__) == sample["doc"]["answer"]))
        assert sample["acc"] == accuracy[-1]  # lm-eval picks the choice the model's own scores pick
    assert checked == sum(len(c) for _, c, _ in MULTIPLE_CHOICE)


def test_generation_through_local_chat_completions_is_the_greedy_answer(server, tasks, lm, tmp_path):
    samples, _ = lm_eval(tmp_path, "--model", "local-chat-completions", "--model_args",
                         f"model=peaky,base_url={server.url}/v1/chat/completions,max_retries=1",
                         "--apply_chat_template", "--include_path", str(tasks), "--tasks", "tunelab_gen")
    assert len(samples) == len(GENERATION)
    model, tok = lm
    stops, answers = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}, []
    for sample in samples:
        messages = json.loads(sample["arguments"]["gen_args_0"]["arg_0"][0])
        assert messages == [{"role": "user", "content": sample["doc"]["question"]}]
        ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=MAX_GEN, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(out) if t in stops), len(out))
        want = tok.decode(out[:cut]).split(UNTIL)[0]
        assert sample["resps"][0][0] == want
        answers.append(want)
    assert any(answers), "the check is vacuous: every answer is empty"
