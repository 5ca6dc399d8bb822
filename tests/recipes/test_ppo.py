"""RLHF-PPO: hand-derived maths (adaptive KL controller, KL-shaped rewards, explained variance),
reward rises on a toy task, LoRA reference = adapter-disabled base,
RM-initialised critic, clear errors (resume: test_resume.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from tether.advantages import explained_variance, kl_shaped_rewards
from tether.config import DataConfig, PPOConfig, PPOParams, load_config
from tether.engine import checkpoint
from tether.errors import ConfigError, DataError
from tether.losses import adaptive_kl_coef
from tether.recipes import ppo

# ------------------------------------------------------------------------------ maths


def test_adaptive_kl_coef_hand_values():
    """Ziegler et al. 2019: e = clip(kl / target - 1, -0.2, 0.2), coef' = coef (1 + e n / H).
    coef 0.1, target 6, horizon 10000, n = 64 (n / H = 0.0064):
      kl 9:   9/6 - 1 = 0.5 -> 0.2;   0.1 * (1 + 0.2 * 0.0064) = 0.1 * 1.00128 = 0.100128
      kl 5.4: 5.4/6 - 1 = -0.1;       0.1 * (1 - 0.1 * 0.0064) = 0.1 * 0.99936 = 0.099936
      kl 0:   0/6 - 1 = -1 -> -0.2;   0.1 * (1 - 0.2 * 0.0064) = 0.1 * 0.99872 = 0.099872
      kl 6:   e = 0;                  0.1"""
    kw = dict(target=6.0, horizon=10000.0, n_steps=64)
    assert adaptive_kl_coef(0.1, 9.0, **kw) == pytest.approx(0.100128, abs=1e-12)
    assert adaptive_kl_coef(0.1, 5.4, **kw) == pytest.approx(0.099936, abs=1e-12)
    assert adaptive_kl_coef(0.1, 0.0, **kw) == pytest.approx(0.099872, abs=1e-12)
    assert adaptive_kl_coef(0.1, 6.0, **kw) == 0.1
    with pytest.raises(ValueError, match="target > 0"):
        adaptive_kl_coef(0.1, 1.0, target=0.0, horizon=1.0, n_steps=1)


def test_kl_shaped_rewards_hand_values():
    """kl_coef 0.1. Row 0: mask [T, T, T, F], kl [0.5, -0.2, 1.0, 7.0], reward 2:
      r = [-0.05, +0.02, -0.1 + 2, 0] = [-0.05, 0.02, 1.9, 0]
    Row 1: mask [T, F, F, F], kl [0.3, 9, 9, 9], reward -1:  r = [-0.03 - 1, 0, 0, 0]"""
    kl = torch.tensor([[0.5, -0.2, 1.0, 7.0], [0.3, 9.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    out = kl_shaped_rewards(torch.tensor([2.0, -1.0], dtype=torch.float64), kl, mask, kl_coef=0.1)
    assert_close(out, torch.tensor([[-0.05, 0.02, 1.9, 0.0], [-1.03, 0.0, 0.0, 0.0]],
                                   dtype=torch.float64))


def test_explained_variance_hand_values():
    """R = [1, 2, 3], V = [1, 2, 2] (a 4th masked entry ignored): R - V = [0, 0, 1],
    Var = 1/3 - 1/9 = 2/9; Var R = 2/3; EV = 1 - (2/9)/(2/3) = 2/3. V = R gives 1; a constant
    V gives 0; constant returns give nan."""
    R = torch.tensor([[1.0, 2.0, 3.0, 50.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    V = torch.tensor([[1.0, 2.0, 2.0, -9.0]], dtype=torch.float64)
    assert explained_variance(V, R, mask).item() == pytest.approx(2 / 3)
    assert explained_variance(R, R, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(R, 7.0), R, mask).item() == pytest.approx(0.0)
    assert torch.isnan(explained_variance(V, torch.ones_like(R), mask))


# ------------------------------------------------------------------------------ the recipe


def e_count(prompts, completions, **columns):
    """Toy reward: occurrences of the letter 'e' in the completion, / 8."""
    return [c.count("e") / 8 for c in completions]


@pytest.fixture(scope="module")
def e_model_dir(tmp_path_factory, default_tokenizer):
    """A tiny random Llama whose embeddings carry one readable feature: coordinate 0 is +0.1
    for tokens whose text contains 'e' and -0.1 otherwise (about half the vocabulary). A random
    model has no such feature, and a reward over 49k random token directions is not learnable
    in a few steps; with it, 'emit tokens with an e' is one direction a tiny policy can learn,
    as a pretrained model would have such features."""
    from tether.engine.models import tiny_llama

    tok = default_tokenizer
    model = tiny_llama(vocab_size=len(tok), tie=True, pad_token_id=tok.pad_token_id)
    has_e = torch.tensor([1.0 if "e" in tok.decode([v]) else -1.0 for v in range(len(tok))])
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.1 * has_e
    path = tmp_path_factory.mktemp("tiny-e")
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def overrides(model_dir, out_dir, *extra):
    return [f"--model.name_or_path={model_dir}", f"--run.output_dir={out_dir}",
            "--ppo.rewards=[tests.recipes.test_ppo:e_count]", "--train.max_steps=10",
            "--train.batch_size=8", "--train.micro_batch_size=8", "--train.lr=5e-3",
            "--train.precision=fp32", "--ppo.max_new_tokens=8", "--ppo.samples_per_prompt=2",
            "--ppo.update_epochs=2", "--run.eval_generations=0", "--run.progress=false",
            "--run.tensorboard=false", *extra]


def run_ppo(*args):
    return ppo.run(load_config(PPOConfig, None, overrides(*args)))


def metric_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_reward_rises_on_toy_task(e_model_dir, tmp_path):
    out = run_ppo(e_model_dir, tmp_path / "run")
    rewards = [h["reward/mean"] for h in out["history"]]
    assert len(rewards) == 10
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.2, rewards  # measured: 0.675 -> 1.08
    h = out["history"][0]
    assert h["kl/k1"] == 0.0  # the first rollout comes from the reference's own weights
    assert out["history"][-1]["kl/k1"] > 0.05  # and the policy has since moved away from it
    keys = set().union(*metric_lines(out["run_dir"]))
    for key in ("reward/mean", "reward/std", "reward/e_count/mean", "kl/k1",
                "kl/coef", "policy/entropy", "policy/clipfrac", "policy/approx_kl",
                "value/loss", "value/clipfrac", "value/explained_variance", "loss/policy",
                "completions/mean_length", "completions/truncated_frac", "timing/generate",
                "timing/score", "timing/update", "optim/lr", "optim/grad_norm"):
        assert key in keys, key
    assert all(h["completions/mean_length"] <= 8 for h in out["history"])
    assert 0 < h["policy/entropy"] <= torch.log(torch.tensor(49152.0)).item() + 1e-3
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out["policy_dir"])  # the exported policy loads


def test_adaptive_kl_coefficient_follows_the_controller(e_model_dir, tmp_path):
    """Each step's kl/coef is adaptive_kl_coef(previous coef, previous kl/k1, ...) (resume, the
    coefficient included: tests/recipes/test_resume.py)."""
    full = run_ppo(e_model_dir, tmp_path / "full", "--train.max_steps=3", "--train.batch_size=4",
                   "--train.micro_batch_size=4", "--ppo.kl_target=0.01", "--ppo.kl_horizon=40",
                   "--ppo.kl_coef=0.2")["history"]
    for prev, cur in zip(full, full[1:]):
        expected = adaptive_kl_coef(prev["kl/coef"], prev["kl/k1"], target=0.01, horizon=40,
                                    n_steps=8)
        assert cur["kl/coef"] == pytest.approx(expected, rel=1e-12)
    assert full[0]["kl/coef"] == 0.2 and full[-1]["kl/coef"] != 0.2


def test_lora_reference_is_base_and_critic_from_reward_model(e_model_dir, tmp_path,
                                                            default_tokenizer):
    """LoRA policy: the reference is the same model with the adapter switched off, so the first
    rollout's KL is exactly 0 and a later one is not (the adapter moved, the reference did not).
    The reward comes from a reward-model directory; the critic starts from it (its head too)."""
    from tether.config import ModelConfig
    from tether.engine.models import load_reward_model

    rm_dir = tmp_path / "rm"
    torch.manual_seed(3)
    rm = load_reward_model(ModelConfig(name_or_path=str(e_model_dir)),
                           default_tokenizer.pad_token_id)
    rm.save_pretrained(rm_dir, safe_serialization=True)
    default_tokenizer.save_pretrained(rm_dir)
    out = run_ppo(e_model_dir, tmp_path / "run", "--train.max_steps=2", "--model.lora.r=4",
                  "--train.batch_size=4", "--train.micro_batch_size=4",
                  f"--ppo.reward_model={rm_dir}", "--ppo.rewards=[format]",
                  "--ppo.reward_weights=[0.5]", "--ppo.critic_init=reward_model",
                  "--train.lr=5e-2")
    h1, h2 = out["history"]
    assert h1["kl/k1"] == 0.0 and h2["kl/k1"] != 0.0
    assert "reward/reward_model/mean" in h1 and "reward/format/mean" in h1
    assert h1["reward/mean"] == pytest.approx(h1["reward/reward_model/mean"]
                                              + 0.5 * h1["reward/format/mean"])
    trainable = load_file(checkpoint.latest(tmp_path / "run" / "checkpoints") / "model.safetensors")
    assert trainable and all("lora_" in k or "score" in k for k in trainable)
    assert any(k.startswith("critic.") and "score" in k for k in trainable)
    assert not any(k.startswith("policy.") and "score" in k for k in trainable)
    # `tether export` of the run gives the policy the run saved (adapter merged in both)
    from tether.cli import main

    assert main(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    saved = load_file(out["policy_dir"] / "model.safetensors")
    assert exported.keys() == saved.keys() and not any("lora" in k for k in saved)
    assert all(torch.equal(exported[k], saved[k]) for k in saved)


def test_critic_from_reward_model_starts_at_its_scores(e_model_dir, tmp_path, default_tokenizer):
    """critic_init=reward_model: the value at the state after the whole sequence equals the
    reward model's score of it (same backbone, same head)."""
    from transformers import AutoModelForSequenceClassification

    from tether.config import ModelConfig
    from tether.engine.models import load_reward_model, load_value_model
    from tether.engine.score import TokenValues

    torch.manual_seed(5)
    rm = load_reward_model(ModelConfig(name_or_path=str(e_model_dir)),
                           default_tokenizer.pad_token_id)
    rm.save_pretrained(tmp_path / "rm", safe_serialization=True)
    critic = TokenValues(load_value_model(ModelConfig(name_or_path=str(tmp_path / "rm")),
                                          default_tokenizer.pad_token_id)).eval()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        full = critic.model(input_ids=ids, attention_mask=mask.long()).logits[0, :, 0]
        values = critic(ids, mask)
        score = loaded(input_ids=ids, attention_mask=mask.long()).logits[0, 0]
    assert_close(full[-1], score)
    assert values[0, 0] == 0 and torch.equal(values[0, 1:], full[:-1])  # V(x_<t) alignment


def test_config_and_data_errors(tiny_model_dir, tmp_path, default_tokenizer):
    with pytest.raises(ConfigError, match="ppo.mini_batches"):
        run_ppo(tiny_model_dir, tmp_path / "a", "--ppo.mini_batches=3")
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        run_ppo(tiny_model_dir, tmp_path / "b", "--train.micro_batch_size=3")
    with pytest.raises(ConfigError, match="temperature"):
        run_ppo(tiny_model_dir, tmp_path / "c", "--ppo.temperature=0.7")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "2 + 2 =", "answer": 4}\n{"chosen": "x", "rejected": "y"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl, row 2: .*preference row.*prompt rows"):
        ppo.load_prompts(PPOConfig(data=DataConfig(path=str(rows))), default_tokenizer)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 50, "answer": 1}) + "\n")
    cfg = PPOConfig(data=DataConfig(path=str(long), max_length=8, truncation=False,
                                    eval_fraction=0.0))
    with pytest.raises(DataError, match="row 1, field 'prompt': has .* more than data.max_length"):
        ppo.load_prompts(cfg, default_tokenizer)
    cfg.data.truncation = True
    train, _ = ppo.load_prompts(cfg, default_tokenizer)
    assert len(train[0].ids) == 8 and train[0].columns == {"answer": 1}
    with pytest.raises(ConfigError, match="reward_weights has 2 entries for 1"):
        ppo.build_reward(PPOParams(rewards=["format"], reward_weights=[1.0, 2.0]), "cpu")


# ------------------------------------------------------------------------------ diagnostics


def e_negated(prompts, completions, **columns):
    """A gold reward that disagrees with the proxy `e_count`: minus it."""
    return [-x for x in e_count(prompts, completions)]


def test_online_diagnostics_gold_kl_k3_distinct_and_samples(e_model_dir, tmp_path):
    """rewards.gold: gold/mean (here minus the proxy) beside reward/mean on every step; kl/k3
    (0 while the policy is the reference, >= 0 after); completions/distinct_2; the warnings the
    logged values call for (window 2: gold falls exactly when the proxy rises), each once;
    samples.jsonl with the held-out greedy completions before and after."""
    from tether.eval.online import Watcher

    out = run_ppo(e_model_dir, tmp_path / "run", "--train.max_steps=4", "--train.batch_size=4",
                  "--train.micro_batch_size=4", f"--rewards.gold={__name__}:e_negated",
                  "--diagnostics.window=2", "--run.eval_generations=2")
    lines = metric_lines(out["run_dir"])
    steps = [x for x in lines if "reward/mean" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    for x in steps:
        assert x["gold/mean"] == pytest.approx(-x["reward/e_count/mean"])
        assert 0.0 <= x["completions/distinct_2"] <= 1.0 and x["kl/k3"] >= 0.0
    assert steps[0]["kl/k3"] == 0.0 and steps[-1]["kl/k3"] > 0.0
    assert "eval/gold" in lines[0] and "eval/gold" in lines[-1]
    replayed = Watcher(load_config(PPOConfig, None, ["--diagnostics.window=2"]).diagnostics)
    expected = {x["step"]: [w.name for w in replayed.observe(x["step"], x)] for x in lines}
    assert {x["step"]: x.get("warnings", []) for x in lines} == expected
    names = [n for x in lines for n in x.get("warnings", [])]
    assert len(names) == len(set(names))
    samples = [json.loads(s) for s in (out["run_dir"] / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 4, 4]
    assert all(set(s) == {"step", "prompt", "completion", "reward", "gold"} for s in samples)
    assert samples[0]["prompt"].startswith("What is") and samples[0]["gold"] == -samples[0]["reward"]
