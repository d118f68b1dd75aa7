"""Grounded answers: the retrieval query of a conversation, the hand-off below the score threshold, the check of an
answer against the passages of its prompt, and a knowledge-base model served through the chat API (whole,
streamed, through the official OpenAI client)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tunelab.config import DEFAULT_HANDOFF, ServeConfig
from tunelab.errors import UserError
from tunelab.rag.answer import AnswerSettings, Assistant, words
from tunelab.rag.index import Index
from tunelab.serve.app import create_app
from tunelab.serve.registry import check_rag, check_specs

KB = Path(__file__).resolve().parents[1] / "examples" / "support-kb"
REFUND = "How many days do I have to ask for a refund of my purchase?"
REFUND_ANSWER = "You can ask for a refund within 30 days of purchase [1]. Write to support with your order number [1]."


@pytest.fixture(scope="module")
def kb_index(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kb") / "index"
    Index.build([KB], out)  # MiniLM: real similarities, so the thresholds mean what they say
    return out


@pytest.fixture(scope="module")
def assistant(kb_index) -> Assistant:
    return Assistant(Index.load(kb_index))


def ask(text: str, *history: str) -> list[dict]:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(history)]
    return [*turns, {"role": "user", "content": text}]


def test_a_short_follow_up_is_read_with_the_question_before_it(assistant):
    assert assistant.query(ask(REFUND)) == REFUND
    follow = ask("and after 40 days?", REFUND, "Within 30 days [1].")
    assert assistant.query(follow) == f"and after 40 days?\n{REFUND}"
    assert assistant.retrieve(follow).hits[0].chunk.headings == ("Refunds",)
    # a follow-up that says enough on its own is searched as it is
    whole = ask("How do I reset the password of my account?", REFUND, "Within 30 days [1].")
    assert assistant.query(whole) == "How do I reset the password of my account?"
    # written without spaces: two characters count as a word
    assert words("那退款呢？") == 2 and words("发票三个工作日内会发到我的邮箱吗") == 8


def test_nothing_relevant_hands_off_before_the_model_is_asked(assistant):
    weather = assistant.retrieve(ask("What will the weather be like in Lisbon tomorrow?"))
    assert not assistant.grounded(weather) and weather.best < assistant.settings.min_score
    refund = assistant.retrieve(ask(REFUND))
    assert assistant.grounded(refund) and refund.hits[0].chunk.headings == ("Refunds",)
    assert not assistant.grounded(assistant.retrieve(ask("   ")))


def test_an_answer_is_checked_against_the_passages_of_its_prompt(assistant):
    retrieval = assistant.retrieve(ask(REFUND))
    prompt = assistant.prompt(ask(REFUND), retrieval)[0]["content"]
    own = assistant.prompt([{"role": "system", "content": "Be brief."}, *ask(REFUND)], retrieval)
    assert [m["role"] for m in own] == ["system", "user"] and own[0]["content"] == prompt + "\n\nBe brief."
    ok = assistant.check(REFUND_ANSWER, retrieval)
    assert ok.handoff is None and ok.text == REFUND_ANSWER
    assert [c["index"] for c in ok.citations] == [1] and all(s["supported"] for s in ok.sentences)
    for c in ok.citations:  # each citation is a passage that was in the prompt, under its number
        hit = retrieval.hits[c["index"] - 1]
        assert (c["document"], c["start"], c["end"]) == (hit.chunk.doc_id, hit.chunk.start, hit.chunk.end)
        assert f"[{c['index']}] " in prompt and " ".join(hit.chunk.text.split()) in prompt
        assert c["heading"] == "Refunds" and 0 < c["score"] <= 1
    # an uncited sentence is checked against every passage and cites the one that backs it
    uncited = assistant.check("You can ask for a refund within 30 days of purchase.", retrieval)
    assert uncited.handoff is None and [c["index"] for c in uncited.citations] == [1]
    # one invented sentence and the whole answer is handed off
    invented = assistant.check(REFUND_ANSWER + " We also give every customer a free laptop and a cruise ticket.",
                               retrieval)
    assert invented.handoff == "unsupported_answer" and invented.text == DEFAULT_HANDOFF and not invented.citations
    assert invented.sentences[-1]["supported"] is False
    # a sentence citing the wrong passage is not backed by it
    wrong = assistant.check("You can ask for a refund within 30 days of purchase [3].", retrieval)
    assert wrong.handoff == "unsupported_answer"
    for declined in ("", DEFAULT_HANDOFF, "I'm sorry, I can't answer that from our documentation."):
        assert assistant.check(declined, retrieval).handoff == "model_declined"


def test_rag_arguments_are_checked_before_the_server_starts(kb_index, peaky_llama, tmp_path):
    specs = check_specs([f"peaky={peaky_llama}", f"other={peaky_llama}"], None)
    assert [(r.id, r.model) for r in check_rag([f"kb={kb_index}@other", f"{kb_index}@peaky"], specs)] == [
        ("kb", "other"), ("index", "peaky")]
    for bad, says in [(str(kb_index), "name the generation model"), (f"{tmp_path}@peaky", "not a tunelab index"),
                      (f"peaky={kb_index}@peaky", "already served as 'peaky'")]:
        with pytest.raises(UserError, match=says):
            check_rag([bad], specs)
    with pytest.raises(UserError, match="serve a generation model"):
        check_rag([str(kb_index)], [])
    with pytest.raises(UserError, match="'typo' is not a served generation model"):
        check_rag([f"{kb_index}@typo"], specs)


@pytest.fixture(scope="module")
def client(kb_index, peaky_llama):
    cfg = ServeConfig(models=[f"peaky={peaky_llama}"], embedding_model=None, rag=[f"support={kb_index}"])
    with TestClient(create_app(cfg, check_specs(cfg.models, None), keys=[]), base_url="http://localhost") as c:
        for _ in range(600):
            if c.get("/ready").status_code == 200:
                break
            __import__("time").sleep(0.1)
        yield c


def _answer_with(monkeypatch, text: str, prompts: list):
    """The generation model answers `text` (a tiny random model cannot answer from passages); its prompts kept."""
    from tunelab.serve.routes import generation

    real = generation._collect

    async def collect(request, call, job, **kw):
        prompts.append(call.served.tokenizer.decode(job.seqs[0].prompt))
        texts, finish, completion, logprobs = await real(request, call, job, **kw)
        return [text], finish, completion, logprobs
    monkeypatch.setattr(generation, "_collect", collect)


def test_a_knowledge_base_model_answers_with_citations(client, monkeypatch):
    assert "support" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    prompts: list[str] = []
    _answer_with(monkeypatch, REFUND_ANSWER, prompts)
    body = client.post("/v1/chat/completions", json={"model": "support", "messages": ask(REFUND),
                                                      "max_tokens": 4}).json()
    assert body["choices"][0]["message"]["content"] == REFUND_ANSWER and body["handoff"] is None
    (cite,) = body["citations"]
    assert cite["document"] == "install.md" and cite["heading"] == "Refunds"
    passage = (KB / "install.md").read_text(encoding="utf-8")[cite["start"]:cite["end"]]
    assert " ".join(passage.split()) in prompts[0] and "[1] Refunds" in prompts[0]

    import openai  # the official client: the extra fields do not break it and are there to read
    oa = openai.OpenAI(base_url="http://localhost/v1", api_key="none", http_client=client)
    done = oa.chat.completions.create(model="support", messages=ask(REFUND), max_tokens=4)
    assert done.choices[0].message.content == REFUND_ANSWER and done.model_extra["citations"][0]["index"] == 1
    chunks = list(oa.chat.completions.create(model="support", messages=ask(REFUND), max_tokens=4, stream=True,
                                             stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REFUND_ANSWER
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason is not None and last.model_extra["citations"] == body["citations"]
    assert chunks[-1].usage.completion_tokens > 0


def test_a_knowledge_base_model_hands_off_instead_of_inventing(client):
    weather = client.post("/v1/chat/completions", json={"model": "support", "messages": ask(
        "What will the weather be like in Lisbon tomorrow?")}).json()
    assert weather["choices"][0]["message"]["content"] == DEFAULT_HANDOFF
    assert weather["handoff"] == {"reason": "no_relevant_passage"} and weather["citations"] == []
    assert weather["usage"]["completion_tokens"] == 0  # the model was not asked
    # a tiny random model's words are not backed by the passages: handed off, not sent
    refund = client.post("/v1/chat/completions", json={"model": "support", "messages": ask(REFUND),
                                                       "max_tokens": 12, "temperature": 0}).json()
    assert refund["choices"][0]["message"]["content"] == DEFAULT_HANDOFF
    assert refund["handoff"]["reason"] in ("unsupported_answer", "model_declined")
    streamed = client.post("/v1/chat/completions", json={"model": "support", "stream": True, "messages": ask(
        "What will the weather be like in Lisbon tomorrow?")})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if re.match(r"data: \{", line)]
    assert events[-1]["handoff"] == {"reason": "no_relevant_passage"}
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == DEFAULT_HANDOFF
    bad = client.post("/v1/chat/completions", json={"model": "support", "messages": ask(REFUND), "n": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
    raw = client.post("/v1/completions", json={"model": "support", "prompt": REFUND})  # no way around the check
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "wrong_model_kind"
    # the model it answers with is still served as itself, without retrieval
    plain = client.post("/v1/chat/completions", json={"model": "peaky", "messages": ask(REFUND), "max_tokens": 4})
    assert "citations" not in plain.json() and "handoff" not in plain.json()


def test_settings_reach_the_assistant(kb_index):
    strict = Assistant(Index.load(kb_index), AnswerSettings(min_score=0.99, handoff="A person will call you."))
    retrieval = strict.retrieve(ask(REFUND))
    assert not strict.grounded(retrieval) and strict.handoff("no_relevant_passage").text == "A person will call you."


def test_eval_rag_scores_retrieval_hand_off_and_answers(kb_index, assistant, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app
    from tunelab.rag.evaluate import evaluate_rag, load_questions, prf

    rows = [{"question": REFUND, "in_scope": True, "doc": "install.md", "heading": "Refunds",
             "answer": "Within 30 days of purchase."},
            {"question": "how do i get a new password", "in_scope": True, "doc": "faq.csv#1",
             "heading": "How do I reset my password?", "answer": "Open Settings, choose Account."},
            {"question": "and on linux?", "in_scope": True, "doc": "install.md", "heading": "Linux",
             "answer": "Use the package manager.", "history": [
                 {"role": "user", "content": "How do I install the program on Windows?"},
                 {"role": "assistant", "content": "Double-click setup.exe [1]."}]},
            {"question": "What will the weather be like in Lisbon tomorrow?", "in_scope": False},
            {"question": "Recommend a good lasagna recipe please", "in_scope": False}]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    questions = load_questions(qfile)
    answers = {REFUND: REFUND_ANSWER}

    def answer(messages):  # the refund question answered from its passage; the others declined
        question = messages[-1]["content"]
        return answers.get(question, DEFAULT_HANDOFF)

    report = evaluate_rag(assistant, questions, answer)
    assert report["retrieval"]["questions"] == 3 and report["retrieval"]["hybrid"]["recall@10"] == 1.0
    assert report["handoff_gate"] == prf([False, False, False, True, True], [False, False, False, True, True])
    a = report["answers"]
    assert a["supported_answer_rate"] == round(1 / 3, 4) and a["handoff"]["recall"] == 1.0
    assert a["handoff"]["precision"] == 0.5 and a["handoff_reasons"]["model_declined"] == 2
    assert report["rows"][0]["citations"][0]["heading"] == "Refunds" and report["rows"][0]["rouge_l"] > 0
    assert prf([True, False], [False, False]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 1,
                                                  "fn": 0}

    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval-rag", str(kb_index), str(qfile), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "MRR@10" in result.output and json.loads(out.read_text())["retrieval"]["questions"] == 3
    for line, says in (('{"question": "no scope flag"}', "`in_scope`"),
                       ('{"question": "q", "in_scope": true, "doc": "d", "heading": "h"}', "reference `answer`"),
                       ('{"question": "q", "in_scope": false, "history": "hi"}', "`history`")):
        qfile.write_text(line + "\n", encoding="utf-8")
        bad = CliRunner().invoke(app, ["eval-rag", str(kb_index), str(qfile)])
        assert isinstance(bad.exception, UserError) and says in str(bad.exception)
    assert CliRunner().invoke(app, ["eval-rag", str(kb_index), str(qfile), "--top-k", "0"]).exit_code == 2


def test_training_data_comes_from_the_knowledge_base_questions(assistant, kb_index, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app
    from tunelab.rag.training import cited_answer, retrieval_pairs, sft_conversations

    pairs = retrieval_pairs(assistant.index.chunks)
    questions = {p["query"] for p in pairs}
    assert "How do I reset my password?" in questions and "Refunds" not in questions  # only question headings
    assert all(p["query"] not in p["passage"] for p in pairs)  # the heading is not its own answer
    assert cited_answer("One thing. Two things! Three", 2) == "One thing [2]. Two things [2]! Three [2]"
    rows = sft_conversations(assistant, handoff_share=0.5, seed=1)
    assert rows and all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in rows)
    for r in rows:
        system, reply = r["messages"][0]["content"], r["messages"][-1]["content"]
        if reply == DEFAULT_HANDOFF:
            continue
        n = int(re.search(r"\[(\d)\]", reply).group(1))  # the cited passage is in the prompt and says the answer
        passage = system.split(f"[{n}] ", 1)[1].split("\n\n[", 1)[0]
        assert reply.split(" [")[0] in passage
    assert {r["messages"][-1]["content"] == DEFAULT_HANDOFF for r in rows} == {True, False}
    result = CliRunner().invoke(app, ["index", "training-data", str(kb_index), "--out", str(tmp_path / "td")])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "td" / "retrieval.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(written) == len(pairs) and json.loads(written[0])["query"] in questions
    again = CliRunner().invoke(app, ["index", "training-data", str(kb_index), "--out", str(tmp_path / "td")])
    assert isinstance(again.exception, UserError) and "--overwrite" in str(again.exception)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "sft.jsonl").write_text("my notes\n", encoding="utf-8")
    theirs = CliRunner().invoke(app, ["index", "training-data", str(kb_index), "--out", str(tmp_path / "mine"),
                                      "--overwrite"])
    assert isinstance(theirs.exception, UserError) and "not written by tunelab" in str(theirs.exception)
    assert not (tmp_path / "mine" / "retrieval.jsonl").exists()  # nothing written when one target is refused
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.md").write_text("# Notes\n\nNo questions here.\n", encoding="utf-8")
    Index.build([plain], tmp_path / "plain-index")
    none = CliRunner().invoke(app, ["index", "training-data", str(tmp_path / "plain-index"), "--out",
                                    str(tmp_path / "none")])
    assert isinstance(none.exception, UserError) and "no heading" in str(none.exception)


def test_markers_after_the_full_stop_numbers_and_unknown_sources(assistant):
    retrieval = assistant.retrieve(ask(REFUND))
    after = assistant.check("You can ask for a refund within 30 days of purchase. [1] Write to support with your "
                            "order number. [1]", retrieval)
    assert after.handoff is None and [c["index"] for c in after.citations] == [1]
    assert [r["sentence"] for r in after.sentences][0].endswith("purchase [1].")
    changed = assistant.check("You can ask for a refund within 40 days of purchase [1].", retrieval)
    assert changed.handoff == "unsupported_answer" and changed.sentences[0]["numbers"] is False
    unknown = assistant.check("You can ask for a refund within 30 days of purchase [7].", retrieval)
    assert unknown.handoff == "unsupported_answer"
    short = assistant.check("Yes [1].", retrieval)
    assert short.handoff is None and [c["index"] for c in short.citations] == [1]
    from tunelab.rag.answer import Retrieval
    assert assistant.check(REFUND_ANSWER, Retrieval(REFUND, [], 0.0)).handoff == "unsupported_answer"


def test_a_chinese_question_is_answered_and_checked(assistant):
    retrieval = assistant.retrieve(ask("我想开发票，怎么操作？"))
    assert assistant.grounded(retrieval) and retrieval.hits[0].chunk.doc_id == "faq.csv#3"
    ok = assistant.check("在订单页面点击“申请发票”，填写抬头和税号 [1]。发票会在三个工作日内发到你的邮箱 [1]。",
                         retrieval)
    assert ok.handoff is None and [c["document"] for c in ok.citations] == ["faq.csv#3"]
    assert len(ok.sentences) == 2  # split at 。 without spaces
    changed = assistant.check("发票会在5个工作日内发到你的邮箱 [1]。", retrieval)  # a number the passage does not state
    assert changed.handoff == "unsupported_answer"
