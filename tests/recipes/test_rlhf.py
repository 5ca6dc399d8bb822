"""`tether rlhf` end to end on a tiny model: SFT -> RM -> PPO, each stage's output feeding the
next; an interrupted stage resumes, finished stages are skipped on a re-run."""

import json

import pytest
import yaml

from tests.recipes.tiny_runs import Killed, kill_after_checkpoint
from tether.config import RLHFConfig, load_config
from tether.data.preference import builtin_preference_rows
from tether.recipes import rlhf, stages


def tiny_overrides(model_dir, out_dir, rm_rows):
    quiet = ["run.progress=false", "run.tensorboard=false", "train.precision=fp32",
             "data.max_length=64"]
    stages = {
        "sft": [f"model.name_or_path={model_dir}", "train.max_steps=3", "train.batch_size=4",
                "train.micro_batch_size=2", "train.lr=1e-2", "run.eval_generations=0"],
        "rm": [f"data.path={rm_rows}", "train.max_steps=3", "train.batch_size=4",
               "train.micro_batch_size=4", "train.lr=1e-2"],
        "ppo": ["train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=4",
                "train.lr=1e-3", "ppo.max_new_tokens=6", "ppo.update_epochs=1",
                "run.eval_generations=0", "run.save_every=1", "ppo.rewards=[arithmetic]",
                "ppo.reward_weights=[0.0]"],
    }
    return [f"--pipeline.output_dir={out_dir}"] + [
        f"--{stage}.{item}" for stage, items in stages.items() for item in items + quiet]


def test_rlhf_end_to_end_resumes_and_skips(tiny_model_dir, tmp_path, monkeypatch):
    out_dir = tmp_path / "rlhf"
    rm_rows = tmp_path / "prefs.jsonl"  # arithmetic pairs: PPO then takes arithmetic prompts
    rm_rows.write_text("".join(json.dumps(r) + "\n" for r in builtin_preference_rows(40)))
    args = tiny_overrides(tiny_model_dir, out_dir, rm_rows)

    # 1. the PPO stage dies right after its step-1 checkpoint; SFT and RM have finished
    kill_after_checkpoint(monkeypatch, 1, where="ppo")
    with pytest.raises(Killed):
        rlhf.run(load_config(RLHFConfig, None, args))
    monkeypatch.undo()
    assert (out_dir / "sft" / "stage.json").is_file() and (out_dir / "rm" / "stage.json").is_file()
    assert not (out_dir / "ppo" / "stage.json").exists()

    # 2. re-run through the CLI: SFT and RM are skipped, PPO resumes at step 2
    from tether.cli import main

    calls = []
    real_run = rlhf.run

    def spy(cfg):
        out = real_run(cfg)
        calls.append(out)
        return out

    monkeypatch.setattr(rlhf, "run", spy)
    assert main(["rlhf", *args]) == 0
    stages = calls[0]["stages"]
    assert stages["sft"]["skipped"] and stages["rm"]["skipped"] and not stages["ppo"]["skipped"]
    lines = [json.loads(x) for x in (out_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "reward/mean" in x]
    assert steps == [1, 2]  # step 1 from the first attempt, step 2 from the resumed one

    # each stage's output fed the next
    sft_model, reward_model = out_dir / "sft" / "model", out_dir / "rm" / "reward_model"
    rm_cfg = yaml.safe_load((out_dir / "rm" / "config.yaml").read_text())
    ppo_cfg = yaml.safe_load((out_dir / "ppo" / "config.yaml").read_text())
    assert rm_cfg["model"]["name_or_path"] == str(sft_model)
    assert ppo_cfg["model"]["name_or_path"] == str(sft_model)
    assert ppo_cfg["ppo"]["reward_model"] == str(reward_model)
    assert ppo_cfg["run"]["resume"] is True
    # the RM scores PPO; the arithmetic verifier is logged beside it at weight 0 (gold vs proxy)
    last = [x for x in lines if "reward/mean" in x][-1]
    assert last["reward/mean"] == pytest.approx(last["reward/reward_model/mean"])
    assert "reward/arithmetic/mean" in last
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(sft_model)
    assert AutoModelForSequenceClassification.from_pretrained(reward_model).config.num_labels == 1
    AutoModelForCausalLM.from_pretrained(out_dir / "ppo" / "policy")
    record = json.loads((out_dir / "ppo" / "stage.json").read_text())
    assert record["output"] == str(out_dir / "ppo" / "policy") and record["seconds"] >= 0

    # 3. a third run has nothing left to do
    before = (out_dir / "ppo" / "metrics.jsonl").read_text()
    again = real_run(load_config(RLHFConfig, None, args))
    assert all(s["skipped"] for s in again["stages"].values())
    assert (out_dir / "ppo" / "metrics.jsonl").read_text() == before


def test_rlhf_defaults_chain_the_stages_on_builtin_data(tmp_path, default_tokenizer,
                                                       monkeypatch):
    """No data arguments: SFT on the built-in demonstrations, the RM on the set `tether prefs`
    builds (here stood in for by the shipped pairs), PPO on that set's distinct training prompts
    (written as prompt files; the eval's held-out prompts for evaluation) with the reward model
    as reward and the task's gold reward (VADER) logged at weight 0."""
    from tether.data.preference import builtin_sentiment_rows
    from tether.recipes import ppo

    rows = builtin_sentiment_rows()
    pairs, held_pairs = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:5]))  # prompts repeat
    held_pairs.write_text(json.dumps(rows[0]) + "\n")
    monkeypatch.setattr(rlhf, "build_prefs", lambda *a, **k: (pairs, held_pairs))
    cfg = load_config(RLHFConfig, None, [f"--pipeline.output_dir={tmp_path}"])
    assert cfg.sft.data.path is None and cfg.rm.data.path is None and cfg.ppo.data.path is None
    dirs = rlhf.stage_dirs(cfg)
    assert dirs == {s: tmp_path / s for s in ("sft", "rm", "ppo")}
    configs = rlhf.stage_configs(cfg, dirs)
    sft_model = str(tmp_path / "sft" / "model")
    assert configs["rm"].model.name_or_path == sft_model
    assert (configs["rm"].data.path, configs["rm"].data.eval_path) == (str(pairs), str(held_pairs))
    ppo_cfg = configs["ppo"]
    assert ppo_cfg.model.name_or_path == sft_model and ppo_cfg.ppo.critic_init == "reward_model"
    assert ppo_cfg.model.lora.r == 16
    assert ppo_cfg.ppo.reward_model == str(tmp_path / "rm" / "reward_model")
    assert ppo_cfg.ppo.rewards == ["tether.recipes.stages:positive_tone"]
    assert ppo_cfg.ppo.reward_weights == [0.0]
    train, held = ppo.load_prompts(ppo_cfg, default_tokenizer)
    assert len(train) == len(rows) and len(held) == cfg.ppo.run.eval_generations == 32
    assert {p.columns["group"] for p in train} == {"review", "note", "message"}
    assert not {repr(p.prompt) for p in train} & {repr(p.prompt) for p in held}
    good, bad = stages.positive_tone([], ["What a lovely, wonderful day!", "This is awful."])
    assert good > 0.5 and bad < -0.3
    # user data for the RM: PPO keeps its own data settings (the built-in arithmetic prompts)
    cfg = load_config(RLHFConfig, None, [f"--pipeline.output_dir={tmp_path}",
                                         "--rm.data.path=prefs.jsonl"])
    assert rlhf.stage_configs(cfg, dirs)["ppo"].data.path is None
