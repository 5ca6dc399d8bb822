"""`tether goodhart` end to end on a tiny random model: proxy RM -> best-of-n -> GRPO against the
proxy -> each checkpoint scored by gold and proxy -> fits, goodhart.json and goodhart.png; a
re-run through the CLI skips every stage and writes the same points."""

import json
import math
import shutil

import pytest

from tether.cli import main
from tether.config import GoodhartConfig, load_config
from tether.errors import ConfigError
from tether.eval.goodhart import bon_kl
from tether.recipes import goodhart


def tiny_args(model_dir, out_dir):
    quiet = ["run.progress=false", "run.tensorboard=false", "train.precision=fp32"]
    rm = ["train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=4",
          "train.lr=1e-2", "data.max_length=64", *quiet]
    grpo = ["train.max_steps=2", "train.micro_batch_size=4", "train.lr=1e-2",
            "run.save_every=1", "grpo.prompts_per_step=2", "grpo.group_size=2",
            "grpo.max_new_tokens=4", "data.max_length=64", "model.lora.r=4", *quiet]
    return [f"--model={model_dir}", f"--output_dir={out_dir}", "--proxy_pairs=8",
            "--num_prompts=2", "--n_max=4", "--max_new_tokens=4", "--rl_samples=2",
            "--precision=fp32", "--progress=false",
            *[f"--rm.{a}" for a in rm], *[f"--grpo.{a}" for a in grpo]]


def test_goodhart_end_to_end_and_rerun_skips(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "goodhart"
    args = tiny_args(tiny_model_dir, out_dir)
    result = goodhart.run(load_config(GoodhartConfig, None, args))

    saved = json.loads((out_dir / "goodhart.json").read_text())
    bon, rl = saved["points"]["bon"], saved["points"]["rl"]
    assert [p["n"] for p in bon] == [1, 2, 3, 4]
    assert [p["kl"] for p in bon] == pytest.approx([bon_kl(n) for n in (1, 2, 3, 4)])
    assert all(p["d"] == pytest.approx(math.sqrt(p["kl"])) for p in bon)
    assert bon[-1]["proxy/mean"] >= bon[0]["proxy/mean"]  # the proxy's argmax of 4 beats its mean
    assert saved["baseline"] == {k: bon[0][k] for k in ("gold/mean", "proxy/mean")}
    assert [p["step"] for p in rl] == [1, 2]  # a checkpoint each step
    assert all(p["kl"] >= 0 and p["d"] == pytest.approx(math.sqrt(p["kl"])) for p in rl)
    for method in ("bon", "rl"):
        for reward in ("gold", "proxy"):
            fit = saved["fits"][method][reward]
            assert math.isfinite(fit["a"]) and math.isfinite(fit["b"]), fit
        assert saved["verdict"][method].startswith(method)
    assert saved["proxy"]["pairs"] == 8 and len(saved["proxy"]["heldout_accuracy"]) == 2
    assert (out_dir / "goodhart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "goodhart: bon: " in capsys.readouterr().out  # the verdicts after the table
    # the GRPO stage trained against the proxy, with the gold logged beside it
    rl_cfg = (out_dir / "rl" / "config.yaml").read_text()
    assert str(out_dir / "proxy" / "reward_model") in rl_cfg and "gold: sentiment" in rl_cfg

    # a re-run through the CLI: every stage skipped, the same points
    assert main(["goodhart", *args]) == 0
    printed = capsys.readouterr().out
    assert "proxy: trained earlier" in printed and "best-of-n:" in printed
    assert "GRPO finished earlier" in printed
    again = json.loads((out_dir / "goodhart.json").read_text())
    assert again["points"] == saved["points"] and result["fits"] == saved["fits"]
    with pytest.raises(ConfigError, match="proxy trained on 8 pairs"):
        goodhart.run(load_config(GoodhartConfig, None, [*args, "--proxy_pairs=12"]))

    # another proxy (`reward_model`) in a new directory that holds the best-of-n samples: they
    # are scored again, not sampled again
    other, proxy = tmp_path / "other", tmp_path / "proxy-copy"
    shutil.copytree(out_dir / "proxy" / "reward_model", proxy)
    other.mkdir()
    shutil.copy(out_dir / "bon.json", other / "bon.json")
    args = [a.replace(str(out_dir), str(other)) for a in args]
    third = goodhart.run(load_config(GoodhartConfig, None, [*args, f"--reward_model={proxy}"]))
    assert "scoring the samples of" in capsys.readouterr().out
    assert [p["gold/mean"] for p in third["points"]["bon"]] == [p["gold/mean"] for p in bon]
    assert json.loads((other / "bon.json").read_text())["scored_by"] == ["sentiment", str(proxy)]


def test_goodhart_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'proxy_pairs'"):
        load_config(GoodhartConfig, None, ["--proxy_pair=8"])
    cfg = load_config(GoodhartConfig, None, [f"--output_dir={tmp_path}", "--proxy_pairs=500"])
    with pytest.raises(ConfigError, match="proxy_pairs must be between"):
        goodhart.train_proxy(cfg, tmp_path)
