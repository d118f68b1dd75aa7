"""`tunelab export` from the command line: the parity table, the export folder, one-line refusals."""

import json

from test_cli import fails_cleanly, tl


def test_export_prints_the_parity_table_and_writes_the_folder(tmp_path, tiny_classifier):
    out = tmp_path / "onnx"
    proc = tl("export", tiny_classifier, "--format", "onnx", "--out", out, "--parity-rows", "8")
    assert "parity of the onnx export (8 rows from" in proc.stdout
    assert "max_abs_diff" in proc.stdout and "≤ 0.0001" in proc.stdout and "onnx_p50_ms_batch1" in proc.stdout
    assert (out / "model.onnx").is_file() and json.loads((out / "tunelab.json").read_text())["kind"] == "export"
    again = tl("export", tiny_classifier, "--format", "onnx", "--out", out, check=False)
    fails_cleanly(again, "already holds an export", "--overwrite")


def test_export_refusals_are_one_line(tmp_path, tiny_classifier):
    fails_cleanly(tl("export", tiny_classifier.parent, "--format", "hf", "--out", tmp_path / "x", check=False),
                  "is a run dir; export its model")
    fails_cleanly(tl("export", tiny_classifier, "--format", "tflite", "--out", tmp_path / "x", check=False),
                  "unknown export format 'tflite'")
    fails_cleanly(tl("export", tmp_path / "nothing", "--format", "hf", "--out", tmp_path / "x", check=False),
                  "model dir not found")


def test_compress_int8_writes_a_model_dir_that_predict_reads(tmp_path, tiny_classifier):
    out = tmp_path / "int8"
    proc = tl("compress", tiny_classifier, "--int8", "--out", out)
    assert "linear layers quantised" in proc.stdout and (out / "model.int8.safetensors").is_file()
    meta = json.loads((out / "tunelab.json").read_text())
    assert meta["kind"] == "model" and meta["compression"]["int8"]["layers"] > 0
    rows = [json.loads(line) for line in tl("predict", out, "what a lovely day", "--json").stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["prediction"] in meta["labels"]
    fails_cleanly(tl("compress", tiny_classifier, "--out", tmp_path / "x", check=False), "--int8")


def test_compress_report_prints_one_table(tmp_path, tiny_classifier):
    tl("compress", tiny_classifier, "--int8", "--out", tmp_path / "int8")
    proc = tl("compress", tiny_classifier, "--report", "--with", tmp_path / "int8", "--rows", "16", "--bf16")
    assert "compression report (16 test rows" in proc.stdout and "pytorch int8" in proc.stdout
    assert "pytorch bf16" in proc.stdout and "pytorch fp32" in proc.stdout
    assert "macro_f1" in proc.stdout
    fails_cleanly(tl("compress", tiny_classifier, "--int8", check=False), "--out DIR")
