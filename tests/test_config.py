from pathlib import Path

import pytest
import yaml

from tunelab.config import apply_overrides, load_config, validate
from tunelab.errors import UserError

ROOT = Path(__file__).parent.parent / "examples"
EXAMPLES = sorted(ROOT.glob("*.yaml")) + sorted((ROOT / "python-faq").glob("*.yaml"))


def base() -> dict:
    return {"model": {"base": "tiny-bert"}, "data": {"dir": "d"}}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path):
    cfg = load_config(path)
    # masked_lm is never auto (text means causal_lm); retrieval and sft say theirs
    assert cfg.task in ("auto", "classification", "masked_lm", "retrieval", "sft")
    assert cfg.data.prepare is not None or Path(cfg.data.dir).exists(), "an example must name its data"


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"tiny.yaml", "tweets-minilm.yaml", "tweets-smollm2-lora.yaml", "finance-ner-minilm.yaml",
            "chatterbot-smollm2-lora.yaml", "pretrain-scratch.yaml", "dapt-minilm.yaml",
            "dapt-then-classify.yaml", "tweets-best.yaml", "retriever-minilm.yaml",
            "assistant-smollm2-lora.yaml"} <= names


def test_masked_lm_options_are_checked():
    assert validate(base() | {"task": "masked_lm"}).model.mlm.probability == 0.15
    with pytest.raises(UserError, match="'model.mlm.probability'"):
        validate({"model": {"base": "tiny-bert", "mlm": {"probability": 1.5}}, "data": {"dir": "d"}})
    with pytest.raises(UserError, match="unknown key 'model.mlm.whole_words'"):
        validate({"model": {"base": "tiny-bert", "mlm": {"whole_words": True}}, "data": {"dir": "d"}})


def test_unknown_key_is_named():
    raw = base() | {"train": {"epochs": 1, "learning_rate": 0.1}}
    with pytest.raises(UserError, match=r"unknown key 'train.learning_rate'"):
        validate(raw)


def test_bad_value_is_named():
    with pytest.raises(UserError, match=r"'train.lr'"):
        validate(base() | {"train": {"lr": -1}})
    with pytest.raises(UserError, match=r"'method.name'"):
        validate(base() | {"method": {"name": "qlora-magic"}})


def test_a_section_of_another_method_is_an_error_and_a_dump_holds_the_methods_own():
    with pytest.raises(UserError, match=r"method.lora configures method lora, but method.name is prompt"):
        validate(base() | {"method": {"name": "prompt", "lora": {"r": 4}}})
    with pytest.raises(UserError, match=r"method.freeze configures method freeze"):
        validate(base() | {"method": {"freeze": {"trainable_layers": 1}}})  # name defaults to full
    cfg = validate(base() | {"method": {"name": "ptuning", "prompt": {"virtual_tokens": 8}}})
    assert cfg.model_dump()["method"] == {"name": "ptuning", "prompt": cfg.method.prompt.model_dump()}
    assert validate(cfg.model_dump(mode="json")) == cfg  # what a run saves loads back


def test_a_run_config_saved_with_every_method_section_still_loads(tmp_path):
    old = base() | {"method": {"name": "freeze", "lora": {"r": 8}, "prompt": {"virtual_tokens": 16},
                               "ia3_target_modules": None, "trainable_layers": 1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(UserError, match="method.lora configures method lora"):
        load_config(tmp_path / "config.yaml")  # a user's config: the stray section is an error
    cfg = load_config(tmp_path / "config.yaml", saved=True)  # a run's own: its method's section, renamed keys
    assert cfg.method.name == "freeze" and cfg.method.freeze.trainable_layers == 1


def test_missing_required_section():
    with pytest.raises(UserError, match="model"):
        validate({"data": {"dir": "d"}})


def test_overrides_parse_yaml_values():
    raw = apply_overrides(base(), ["train.epochs=2", "train.lr=3e-5", "method.name=lora",
                                   "method.lora.target_modules=[q,v]", "data.max_train_examples=null"])
    cfg = validate(raw)
    assert cfg.train.epochs == 2 and cfg.train.lr == 3e-5
    assert cfg.method.lora.target_modules == ["q", "v"]
    with pytest.raises(UserError, match="section.key=value"):
        apply_overrides(base(), ["train.epochs"])
    with pytest.raises(UserError, match="not a section"):
        apply_overrides(base(), ["model.base.x=1"])


def test_load_config_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(UserError, match="mapping"):
        load_config(lst)


def test_cli_defaults_come_from_the_config_models():
    """Each flag that sets a config key shows the key's own default and passes None when not given, so the
    config model (or a saved section) decides: the defaults cannot drift apart."""
    import typer

    from tunelab.cli import app
    from tunelab.config import DedupConfig, EvalConfig, PrepareOptions, ServeConfig

    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}
    commands.update({f"data {c.name}": c for c in typer.main.get_command(app).commands["data"].commands.values()})
    flag_fields = {
        "eval": (EvalConfig, {"zero_shot_samples": "zero_shot_samples", "zero_shot_model": "zero_shot_model",
                              "generation_samples": "generation_samples", "max_new_tokens": "max_new_tokens",
                              "general_text": "general_text", "general_samples": "general_samples",
                              "batch_size": "batch_size", "baseline": "baselines"}),
        "serve": (ServeConfig, {"host": "host", "port": "port", "max_batch": "max_batch",
                                "max_waiting": "max_waiting", "encoder_batch": "encoder_batch",
                                "encoder_wait_ms": "encoder_wait_ms", "precision": "precision",
                                "rate_limit": "rate_limit", "drain_timeout": "drain_timeout_s",
                                "max_body_bytes": "max_body_bytes", "embedding_model": "embedding_model",
                                "max_header_bytes": "max_header_bytes", "header_timeout": "header_timeout_s",
                                "body_timeout": "body_timeout_s", "max_connections": "max_connections"}),
        "data prepare": (PrepareOptions, {"seed": "seed", "val_ratio": "val_ratio", "test_ratio": "test_ratio",
                                          "max_drop_rate": "max_drop_rate", "max_rows": "max_rows"}),
        "data overlap": (DedupConfig, {"threshold": "threshold"}),
    }
    for name, (cls, fields) in flag_fields.items():
        params = {p.name: p for p in commands[name].params}
        for flag, field in fields.items():
            default = cls.model_fields[field].default
            shown = "none" if default is None else ", ".join(default) if isinstance(default, list) else default
            assert params[flag].default is None, (name, flag)
            assert f"(default: {shown})" in params[flag].help, (name, flag, params[flag].help)


def test_remedy_settings_validate():
    cfg = validate(base() | {"train": {"adversarial": "pgd", "label_smoothing": 0.1},
                             "model": {"base": "tiny-bert", "hidden_dropout": 0.2}})
    assert cfg.train.adversarial.method == "pgd" and cfg.train.adversarial.epsilon == 1.0
    assert validate(apply_overrides(base(), ["train.adversarial=fgm"])).train.adversarial.method == "fgm"
    with pytest.raises(UserError, match="train.adversarial"):
        validate(base() | {"train": {"adversarial": "fsgm"}})
    with pytest.raises(UserError, match="label_smoothing"):
        validate(base() | {"train": {"label_smoothing": 1.0}})
    with pytest.raises(UserError, match="ensemble.seeds"):
        validate(base() | {"ensemble": {"seeds": [3]}})
