"""Config: YAML + dotted overrides, typed values, unknown keys name the nearest valid key."""

import pytest

from tether.cli import main
from tether.config import SFTConfig, load_config, parse_override
from tether.errors import ConfigError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  batch_size: 16\nmodel:\n  lora:\n    r: 8\n")
    cfg = load_config(SFTConfig, path, ["--train.lr=3e-4", "--data.packing=true",
                                        "--model.lora.target_modules=q_proj,v_proj"])
    assert cfg.train.lr == 3e-4  # override wins over the file
    assert cfg.train.batch_size == 16  # file wins over the default
    assert cfg.train.micro_batch_size == 4  # default kept
    assert cfg.model.lora.r == 8 and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.packing is True


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.learning_rat'.*'train\.lr'|"
                                          r"unknown config key 'train\.lrr'.*'train\.lr'"):
        load_config(SFTConfig, None, ["--train.lrr=1"])
    with pytest.raises(ConfigError, match=r"'trian'.*did you mean 'train"):
        load_config(SFTConfig, None, ["--trian.lr=1"])


def test_wrong_types_are_errors_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size' must be an integer"):
        load_config(SFTConfig, None, ["--train.batch_size=eight"])
    with pytest.raises(ConfigError, match="data.packing' must be true or false"):
        load_config(SFTConfig, None, ["--data.packing=maybe"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(SFTConfig, bad, [])


def test_parse_override_forms():
    assert parse_override("--train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override("data.path=rows.jsonl") == ("data.path", "rows.jsonl")
    assert parse_override("--data.eval_path=null") == ("data.eval_path", None)
    with pytest.raises(ConfigError):
        parse_override("--train.lr")


def test_cli_prints_one_line_error_without_traceback(capsys):
    assert main(["sft", "--train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tether: error: unknown config key 'train.lrr'")
    assert "Traceback" not in err
    assert main(["stf"]) == 2
    assert "did you mean 'sft'" in capsys.readouterr().err


def test_help_lists_recipes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "export" in out
