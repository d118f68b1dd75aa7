"""The CLI as a newcomer meets it, in subprocesses started from a folder outside the repository: every mistake
is one `error:` line (exit 2), config paths mean what they say, nothing is done silently, outputs agree."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import make_rows, tiny_config, write_csv

REPO = Path(__file__).resolve().parents[2]


def tl(*args, cwd, check=True, stdin=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("COLUMNS", None)  # the width of a pipe is tunelab's choice, not the test's
    proc = subprocess.run([sys.executable, "-m", "tunelab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"tunelab {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def one_error_line(proc, *fragments) -> str:
    """The process failed as a user mistake: exit 2, nothing on stdout, one `error:` line on stderr."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert proc.stdout == "", proc.stdout
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def outside(tmp_path) -> Path:
    """A working folder that is not the repository (nothing relative to the repository resolves from it)."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    assert REPO not in d.resolve().parents
    return d


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's project: configs/tiny.yaml names its source file and its dataset dir relative to itself."""
    root = tmp_path_factory.mktemp("project")
    (root / "configs").mkdir()
    (root / "raw").mkdir()
    write_csv(root / "raw" / "reviews.csv", make_rows(300))
    cfg = tiny_config(Path("../data/reviews"), max_steps=3, save_every=0, log_every=1, epochs=1)
    cfg["data"]["prepare"] = {"source": "../raw/reviews.csv", "seed": 0}
    (root / "configs" / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.fixture(scope="module")
def trained_run(project, tmp_path_factory):
    """`tunelab train configs/tiny.yaml` run from an unrelated folder, into a run dir whose name looks like rich
    markup (`r[/un]`: a closing tag): the run dir, and what it printed."""
    cwd = tmp_path_factory.mktemp("cwd")
    proc = tl("train", project / "configs" / "tiny.yaml", "--out", "r[/un]", cwd=cwd)
    return cwd / "r[/un]", proc


# ---- 1, 2: data preparation is announced; paths in a config are relative to the config --------------------

def test_train_announces_the_data_it_prepares_and_records_it(project, trained_run):
    run, proc = trained_run
    data = (project / "data" / "reviews").resolve()
    assert (data / "dataset.json").is_file()  # beside the config, not in the folder the command ran from
    announce = next(line for line in proc.stderr.splitlines() if line.startswith("preparing "))
    assert str((project / "raw" / "reviews.csv").resolve()) in announce and str(data) in announce
    assert "saved r[/un]/model · best validation" in proc.stderr  # the run dir's name printed as written
    assert proc.stderr.index("preparing ") < proc.stderr.index("train classification")  # before the work
    info = json.loads((run / "tunelab.json").read_text())
    assert info["data"]["prepared_by_this_run"]["source"] == str((project / "raw" / "reviews.csv").resolve())
    assert info["data"]["prepared_by_this_run"]["dir"] == str(data)


def test_run_and_model_record_absolute_paths(project, trained_run):
    run, _ = trained_run
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["dir"] == str((project / "data" / "reviews").resolve())
    assert saved["data"]["prepare"]["source"] == str((project / "raw" / "reviews.csv").resolve())
    model = json.loads((run / "model" / "tunelab.json").read_text())
    assert Path(model["data"]["path"]).is_absolute() and Path(model["data"]["dir"]).is_absolute()


def test_eval_from_another_folder_finds_the_training_data(trained_run, outside):
    run, _ = trained_run
    proc = tl("eval", run / "model", "--no-baselines", cwd=outside)
    assert "macro" in proc.stdout.lower()


def test_shipped_ner_example_resolves_from_outside_the_repository(outside, monkeypatch):
    from tunelab.config import load_config

    monkeypatch.chdir(outside)
    cfg = load_config(REPO / "examples" / "finance-ner-minilm.yaml", ["data.dir=mine"])
    assert Path(cfg.data.prepare.source) == REPO / "examples" / "data" / "finance_ner.conll"
    assert Path(cfg.data.prepare.source).is_file()
    assert Path(cfg.data.dir) == outside.resolve() / "mine"  # an override is relative to where it was typed


def test_model_references_stay_names_unless_they_are_paths(tmp_path):
    from tunelab.config import resolve_paths

    (tmp_path / "my-model").mkdir()
    raw = {"model": {"base": "builtin:minilm-l6"}, "eval": {"zero_shot_model": "org/some-model"},
           "data": {"dir": "d", "prepare": {"source": "builtin:tweets-sentiment", "clean": {"tokenizer": "./tok"}}}}
    resolve_paths(raw, tmp_path)
    assert raw["model"]["base"] == "builtin:minilm-l6" and raw["eval"]["zero_shot_model"] == "org/some-model"
    assert raw["data"]["prepare"]["source"] == "builtin:tweets-sentiment"
    assert raw["data"]["prepare"]["clean"]["tokenizer"] == str(tmp_path / "tok")
    assert raw["data"]["dir"] == str(tmp_path / "d")
    raw = resolve_paths({"model": {"base": "my-model"}, "eval": {"zero_shot_model": "tiny-llama"}}, tmp_path)
    assert raw["model"]["base"] == str(tmp_path / "my-model") and raw["eval"]["zero_shot_model"] == "tiny-llama"
    (tmp_path / "scratch").mkdir()  # a folder named like a reserved name does not capture it
    assert resolve_paths({"model": {"base": "scratch"}}, tmp_path)["model"]["base"] == "scratch"


def test_path_overrides_are_paths_as_typed_and_bad_ones_are_named(outside, monkeypatch):
    from tunelab.config import apply_overrides
    from tunelab.errors import UserError

    monkeypatch.chdir(outside)
    raw = apply_overrides({}, ["data.dir=2024", "train.epochs=2"], paths_from=outside)
    assert raw["data"]["dir"] == str(outside.resolve() / "2024") and raw["train"]["epochs"] == 2
    with pytest.raises(UserError, match="'data.dir': not a usable path"):
        apply_overrides({}, ["data.dir=a\0b"], paths_from=outside)


# ---- 7: one line for a bad config, an unknown option, a missing argument ------------------------------------

def test_invalid_yaml_is_one_line_naming_file_line_and_column(outside):
    (outside / "bad.yaml").write_text("model:\n  base: tiny-bert\ndata: [unclosed\n")
    one_error_line(tl("train", "bad.yaml", cwd=outside, check=False), "bad.yaml is not valid YAML", "line 4")
    (outside / "tab.yaml").write_text("model:\n\tbase: x\n")
    one_error_line(tl("train", "tab.yaml", cwd=outside, check=False), "tab.yaml", "line 2, column 1")


def test_usage_mistakes_are_one_line_and_help_stays_full(outside):
    one_error_line(tl("train", "x.yaml", "--epochs", "3", cwd=outside, check=False), "no such option: --epochs",
                   "tunelab train --help")
    one_error_line(tl("eval", cwd=outside, check=False), "missing argument", "tunelab eval --help")
    one_error_line(tl("predict", "m", "hi", "--batch-size", "many", cwd=outside, check=False), "--batch-size")
    one_error_line(tl("trian", cwd=outside, check=False), "no such command 'trian'")
    one_error_line(tl("data", "prepare", cwd=outside, check=False), "missing argument")
    helped = tl("train", "--help", cwd=outside)
    assert "Usage:" in helped.stdout and "--resume" in helped.stdout and "--overwrite" in helped.stdout


# ---- 8: the resume hint is a command that works (see also test_train_faults) ---------------------------------

def test_resume_without_a_config_uses_the_runs_own(trained_run, outside):
    from tunelab.train.loop import resume_command

    run, _ = trained_run
    proc = tl("train", "--out", run, "--resume", "auto", cwd=outside)  # same config: no --force needed
    assert "resumed from" in proc.stderr and "step-3" in proc.stderr and json.loads(proc.stdout)["steps"] == 3
    one_error_line(tl("train", "--out", outside, "--resume", "auto", cwd=outside, check=False),
                   "not a tunelab run dir")
    one_error_line(tl("train", cwd=outside, check=False), "give a CONFIG")
    one_error_line(tl("train", run, cwd=outside, check=False), "is a folder, not a YAML config file",
                   resume_command(run))


# ---- 9: fixed width and no markup or emoji processing of user text ------------------------------------------

def test_logs_do_not_wrap_and_user_text_is_printed_as_written(trained_run, small_dataset, outside):
    _, proc = trained_run
    line = next(x for x in proc.stderr.splitlines() if x.startswith("train classification"))
    assert "trainable" in line and "steps on" in line  # one line, however long, in a pipe
    (outside / "b.jsonl").write_text(json.dumps({"text": "nothing like the reviews"}) + "\n")
    out = tl("data", "overlap", f"{small_dataset}:train", "b.jsonl", cwd=outside).stdout
    line = next(x for x in out.splitlines() if x.startswith("1 rows of b.jsonl"))
    assert f"{small_dataset}:train: 0 exact" in line  # not an emoji in place of :train:, and on one line


def test_labels_and_paths_with_brackets_print_as_written(outside):
    rows = [{"text": r["text"] + " [/red] :train:", "label": {"positive": "[/pos]", "negative": "[neg]"}.get(
        r["label"], r["label"])} for r in make_rows(90)]
    write_csv(outside / "brackets.csv", rows)
    out = tl("data", "prepare", "brackets.csv", "--out", "[out]", cwd=outside).stdout
    assert "dataset [out] ·" in out and "[/pos]" in out and "[neg]" in out


# ---- 10: one predict schema; stdout by default; - for stdin ------------------------------------------------

def test_predict_has_one_schema_stdout_by_default_and_reads_stdin(tiny_classifier, outside):
    texts = [r["text"] for r in make_rows(3, seed=99, start=1000)]
    rows = "".join(json.dumps({"id": i, "text": t, "label": "gold"}) + "\n" for i, t in enumerate(texts))
    (outside / "in.jsonl").write_text(rows)
    runs = {  # independent invocations, each a fresh interpreter: two at a time (two cores)
        "json": dict(args=(*texts, "--json")),
        "file": dict(args=("--input", "in.jsonl")),  # no --out: JSON lines on stdout
        "piped": dict(args=("--input", "-"), stdin=rows),
        "lines": dict(args=("-",), stdin="\n".join(texts) + "\n\n"),
        "out": dict(args=("--input", "in.jsonl", "--out", "pred.jsonl")),
        "out_and_texts": dict(args=("hi", "--out", "p.jsonl"), check=False),
        "empty_stdin": dict(args=("-",), stdin="", check=False),
    }
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(runs, pool.map(lambda r: tl("predict", tiny_classifier, *r["args"], cwd=outside,
                                                     check=r.get("check", True), stdin=r.get("stdin")),
                                       runs.values())))
    as_json = [json.loads(x) for x in done["json"].stdout.splitlines()]
    assert [set(r) for r in as_json] == [{"text", "prediction", "probs"}] * 3
    from_file = [json.loads(x) for x in done["file"].stdout.splitlines()]
    assert [r["prediction"] for r in from_file] == [r["prediction"] for r in as_json]
    assert all(r["label"] == "gold" and set(r) == {"id", "text", "label", "prediction", "probs"} for r in from_file)
    assert [json.loads(x) for x in done["piped"].stdout.splitlines()] == from_file
    assert [json.loads(x) for x in done["lines"].stdout.splitlines()] == as_json
    assert [json.loads(x) for x in (outside / "pred.jsonl").read_text().splitlines()] == from_file
    one_error_line(done["out_and_texts"], "--out")
    one_error_line(done["empty_stdin"], "standard input is empty")


def test_predict_reads_invalid_utf8_and_lone_surrogates_without_a_traceback(tiny_classifier, outside):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tunelab", "predict", str(tiny_classifier), "-"], cwd=outside,
                          input=b"good \xff day\n" + json.dumps({"text": "a \ud800 b"}).encode() + b"\n",
                          capture_output=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    rows = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    assert [r["text"] for r in rows] == ["good \ufffd day", json.dumps({"text": "a \ud800 b"})]  # text lines
    proc = subprocess.run([sys.executable, "-m", "tunelab", "predict", str(tiny_classifier), "--input", "-"],
                          cwd=outside, input=json.dumps({"text": "a \ud800 b"}).encode() + b"\n",
                          capture_output=True, env=env, timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stdout)["text"] == "a \ufffd b", proc.stderr.decode()


def test_predict_table_prints_brackets_in_user_text_as_written(tiny_classifier, outside):
    out = tl("predict", tiny_classifier, "[red]great[/red] :smile:", cwd=outside).stdout
    assert "[red]great[/red] :smile:" in out and "prediction" in out


# ---- 11: chat commands and Ctrl-C ------------------------------------------------------------------------

def _read_until(proc, stream, marker: str, timeout: float = 120) -> str:
    """What `stream` gives until `marker` has come (an empty marker: the next chunk)."""
    got, end = "", time.time() + timeout
    while marker not in got or not got:
        assert time.time() < end, f"no {marker!r} in time: {got!r}"
        ready, _, _ = select.select([stream], [], [], 0.5)
        if ready:
            chunk = os.read(stream.fileno(), 4096).decode(errors="replace")
            assert chunk, f"stream closed before {marker!r}: {got!r}"
            got += chunk
    return got


def test_chat_commands_answer_and_ctrl_c_stops_only_the_answer(outside):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # tiny-llama never produces its end token: an answer runs to --max-tokens, long enough to be interrupted
    # as at a terminal: Ctrl-C interrupts. A test run started in the background (`cmd &` in a script) inherits SIGINT
    # ignored, and Python leaves an inherited SIG_IGN alone, so the chat would never see the signal
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "chat", "tiny-llama", "--max-tokens", "900"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=outside,
                            env=env, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _read_until(proc, proc.stderr, "/help lists the commands")
        proc.stdin.write("/help\n/reset\n/frobnicate\n")
        proc.stdin.flush()
        err = _read_until(proc, proc.stderr, "unknown command /frobnicate")
        assert "/reset" in err and "history cleared" in err
        proc.stdin.write("hello there\n")
        proc.stdin.flush()
        streamed = _read_until(proc, proc.stdout, "model> ")
        while len(streamed.split("model> ", 1)[1]) < 80:  # well into the answer (first-token set-up is over)
            streamed += _read_until(proc, proc.stdout, "")
        proc.send_signal(signal.SIGINT)
        _read_until(proc, proc.stderr, "(answer stopped)")
        proc.stdin.write("/history\n/exit\n")
        proc.stdin.flush()
        err = _read_until(proc, proc.stderr, "in the history")
        assert "1 exchange in the history" in err
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


# ---- 12: version, help, defaults written one way --------------------------------------------------------

def test_version_and_help_list_every_command_with_defaults_written_one_way(outside):
    from tunelab import __version__

    assert tl("--version", cwd=outside).stdout.strip() == f"tunelab {__version__}"
    top = tl("--help", cwd=outside).stdout
    for command in ("train", "eval", "predict", "generate", "chat", "serve", "quickstart", "data prepare",
                    "data overlap"):
        assert command in top, command
    for command in (["train"], ["eval"], ["predict"], ["generate"], ["chat"], ["serve"], ["quickstart"],
                    ["data", "prepare"], ["data", "overlap"]):
        text = tl(*command, "--help", cwd=outside).stdout
        assert "[default:" not in text, command
    serve = tl("serve", "--help", cwd=outside).stdout
    from tunelab.config import ServeConfig

    for field in set(ServeConfig.model_fields) - {"models"}:  # every serve setting has its flag: none is dead
        assert f"--{field.removesuffix('_s').replace('_', '-')} " in serve, field
    gen = tl("generate", "--help", cwd=outside).stdout
    assert "(default: 256)" in " ".join(gen.split())
    prep = " ".join(tl("data", "prepare", "--help", cwd=outside).stdout.split())
    for kind in (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt", ".yml", ".conll", "builtin:chatterbot",
                 "folder"):
        assert kind in prep, kind
