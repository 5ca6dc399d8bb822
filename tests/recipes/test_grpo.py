"""GRPO family end to end on a tiny model: reward rises on a toy task (grpo, dapo), dynamic
sampling drops equal-reward groups, the reference is loaded only when beta > 0, and leaving
zero-advantage rows out of the forward changes no gradient (resume: test_resume.py)."""

import json

import pytest
import torch

from tether.config import GRPOConfig, load_config
from tether.data.prompts import split_task_rows
from tether.errors import ConfigError, DataError
from tether.recipes import grpo


def space_fraction(prompts, completions, **columns):
    """Toy reward: the fraction of a completion's characters that are spaces."""
    return [sum(c == " " for c in t) / max(1, len(t)) for t in completions]


def even_answers_constant(prompts, completions, answer, **columns):
    """1.0 for every completion of a prompt with an even answer (a group of equal rewards),
    the space fraction otherwise."""
    spaces = space_fraction(prompts, completions)
    return [1.0 if int(a) % 2 == 0 else s for a, s in zip(answer, spaces)]


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory, default_tokenizer):
    """A tiny random Llama whose (tied) embeddings are scaled up 30x, so its next-token
    distribution is peaked (entropy ~1 nat instead of ~log V = 10.8) and sampling explores a few
    tokens per context, as a real model does, instead of the whole 49k vocabulary."""
    from tether.engine.models import tiny_llama

    path = tmp_path_factory.mktemp("peaked-llama")
    model = tiny_llama(vocab_size=len(default_tokenizer), tie=True,
                       pad_token_id=default_tokenizer.pad_token_id)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(30.0)
    model.save_pretrained(path, safe_serialization=True)
    default_tokenizer.save_pretrained(path)
    return path


def overrides(model_dir, out_dir, *extra):
    return [f"--model.name_or_path={model_dir}", f"--run.output_dir={out_dir}",
            "--model.lora.r=0", "--train.max_steps=6", "--train.lr=1e-2",
            "--train.precision=fp32", "--train.micro_batch_size=8", "--grpo.group_size=8",
            "--grpo.prompts_per_step=2",
            "--grpo.max_new_tokens=8", "--grpo.task_size=64", "--run.eval_generations=0",
            f"--grpo.rewards={__name__}:space_fraction", "--run.progress=false",
            "--run.tensorboard=false", *extra]


def _run(model_dir, out_dir, *extra):
    return grpo.run(load_config(GRPOConfig, None, overrides(model_dir, out_dir, *extra)))


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "reward/mean" in r}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_reward_rises_on_toy_task(peaked_model_dir, tmp_path, loss_type):
    out = _run(peaked_model_dir, tmp_path / "run", f"--grpo.loss_type={loss_type}")
    rewards = [h["reward/mean"] for h in out["history"]]
    assert len(rewards) == 6
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.05, rewards
    last = out["history"][-1]
    for key in ("reward/std", "reward/space_fraction/mean", "policy/entropy",
                "policy/clipfrac_low", "policy/clipfrac_high", "policy/approx_kl",
                "completions/mean_length", "completions/truncated_frac", "groups/zero_std_frac",
                "timing/generate", "timing/score", "timing/update"):
        assert key in last, key
    assert out["reference"] is None


def test_dynamic_sampling_drops_equal_reward_groups(peaked_model_dir, tmp_path, monkeypatch):
    """Prompts with an even answer get one reward for all their samples: with dynamic sampling
    their groups leave the update; without it they stay in the normalisation."""
    seen = []
    real = grpo.micro_batches

    def spy(rollout, advantages, *args):
        seen.append((rollout.texts, advantages.clone()))
        return real(rollout, advantages, *args)

    monkeypatch.setattr(grpo, "micro_batches", spy)
    reward = f"--grpo.rewards={__name__}:even_answers_constant"
    out = _run(peaked_model_dir, tmp_path / "ds", reward, "--train.max_steps=3",
               "--grpo.loss_type=dapo", "--grpo.prompts_per_step=4")
    cfg = load_config(GRPOConfig, None, overrides(peaked_model_dir, tmp_path))
    rows, _ = split_task_rows(cfg.grpo.task_size, 0, difficulty=cfg.grpo.task_difficulty,
                              shots=cfg.grpo.task_shots)
    for step, h in enumerate(out["history"]):
        prompts = grpo.step_items(rows, step, 4, cfg.train.seed)
        even = sum(int(p["answer"]) % 2 == 0 for p in prompts)
        assert h["groups/zero_std_frac"] == even / 4
        assert h["groups/kept"] == 4 - even
        n_rows = len(seen[step][0])
        assert n_rows == max(1, (4 - even) * 8) or (even == 4 and n_rows == 0)
    assert any(h["groups/kept"] < 4 for h in out["history"])  # the test exercised a drop


def test_zero_advantage_rows_leave_no_gradient(peaked_model_dir, default_tokenizer):
    """Leaving rows with advantage 0 out of the forward (counting only their denominator share),
    and running each group's prompt once for its rows, gives the gradient of the whole batch
    forwarded row by row, for every aggregation."""
    from functools import partial

    from tether.config import ModelConfig
    from tether.engine.generate import SamplingParams, TorchBackend, encode_prompt
    from tether.engine.logprobs import CausalLMLogps
    from tether.engine.models import load_causal_lm
    from tether.engine.optimize import accumulate_gradients

    policy = CausalLMLogps(load_causal_lm(ModelConfig(name_or_path=str(peaked_model_dir))))
    prompts = [encode_prompt(default_tokenizer, p) for p in ("What is 2 + 3?", "Hi there")]
    r = TorchBackend(policy, default_tokenizer).generate(
        prompts, SamplingParams(max_new_tokens=6, group_size=4),
        generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([0.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # group 2: all equal
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        obj = grpo.build_objective(load_config(GRPOConfig, None, [
            f"--grpo.loss_type={loss_type}", "--grpo.max_new_tokens=6"]).grpo)

        def grads(batches):
            policy.zero_grad()
            accumulate_gradients(policy, batches, loss_fn=partial(grpo.micro_batch_loss, obj=obj),
                                 count_units=partial(grpo.count_units, obj),
                                 device=torch.device("cpu"), precision="fp32")
            return [p.grad.clone() for p in policy.parameters()]

        whole = grads(grpo.micro_batches(r, adv, 3))
        rows = torch.tensor([1, 2])
        part = grpo.micro_batches(r.select(rows), adv[rows], 3, rows // 4)
        part[0].extra_units = grpo.units_of(obj, r.completion_mask[[0, 3, 4, 5, 6, 7]])
        for g, h in zip(whole, grads(part)):
            torch.testing.assert_close(g, h, atol=1e-7, rtol=1e-5)


def test_reference_only_when_beta_positive(peaked_model_dir, tmp_path, monkeypatch):
    """beta = 0 loads one model (the policy); beta > 0 loads a frozen reference too, except with
    LoRA, where the reference is the policy with its adapter disabled."""
    from tether.engine import reference

    calls = []
    real = grpo.load_causal_lm
    count = lambda cfg: calls.append(cfg) or real(cfg)  # noqa: E731
    monkeypatch.setattr(grpo, "load_causal_lm", count)  # the policy
    monkeypatch.setattr(reference, "load_causal_lm", count)  # the reference (load_reference)
    out = _run(peaked_model_dir, tmp_path / "b0", "--train.max_steps=1")
    assert len(calls) == 1 and out["reference"] is None
    assert "kl/k3" not in out["history"][0]

    calls.clear()
    out = _run(peaked_model_dir, tmp_path / "b1", "--train.max_steps=2", "--grpo.beta=0.1")
    assert len(calls) == 2 and out["reference"] is not None
    assert not any(p.requires_grad for p in out["reference"].parameters())
    assert out["history"][0]["kl/k3"] == 0.0  # before any update the policy is the reference
    assert out["history"][1]["kl/k3"] > 0
    assert out["history"][0]["kl/k1"] == 0.0 and out["history"][1]["kl/k1"] != 0.0

    calls.clear()
    out = _run(peaked_model_dir, tmp_path / "lora", "--train.max_steps=2", "--grpo.beta=0.1",
               "--model.lora.r=4")
    assert len(calls) == 1 and out["reference"] is None
    assert out["history"][0]["kl/k3"] == 0.0 and out["history"][1]["kl/k3"] > 0


def test_loss_types_and_config_errors():
    obj = lambda *o: grpo.build_objective(load_config(GRPOConfig, None, list(o)).grpo)  # noqa: E731
    dapo = obj("--grpo.loss_type=dapo")
    assert (dapo.eps_low, dapo.eps_high, dapo.dynamic_sampling) == (0.2, 0.28, True)
    assert dapo.kind.aggregation == "token_mean"
    assert obj("--grpo.loss_type=dr_grpo").kind.aggregation == "constant_normalizer"
    assert obj("--grpo.loss_type=gspo").kind.ratio_level == "sequence"
    assert obj("--grpo.loss_type=dapo", "--grpo.eps_high=0.3").eps_high == 0.3
    assert not obj("--grpo.loss_type=dapo", "--grpo.dynamic_sampling=false").dynamic_sampling
    with pytest.raises(ConfigError, match="grpo.loss_type must be one of grpo, dr_grpo"):
        obj("--grpo.loss_type=ppo")
    with pytest.raises(ConfigError, match="group_size"):
        obj("--grpo.group_size=1")
    with pytest.raises(ConfigError, match="reward_weights"):
        grpo.build_rewards(load_config(GRPOConfig, None, ["--grpo.reward_weights=[1, 2, 3]"]).grpo)


def test_prompt_rows_errors_name_the_row(default_tokenizer, tmp_path):
    from tether.config import DataConfig
    from tether.data.prompts import load_prompt_examples

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "2 + 2 =", "answer": 4}) + "\n"
                    + json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl.*row 2.*prompt rows"):
        load_prompt_examples(DataConfig(path=str(path)), default_tokenizer)
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "k": 1}) + "\n"
                    + json.dumps({"prompt": "two"}) + "\n")
    train, held = load_prompt_examples(DataConfig(path=str(path), eval_fraction=0.5),
                                       default_tokenizer)
    assert len(train) == 1 and len(held) == 1
    first = (train + held)[[e.prompt for e in train + held].index([{"role": "user",
                                                                    "content": "hi"}])]
    assert first.columns == {"k": 1} and first.ids[-3:] == default_tokenizer(
        "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-3:]


def test_online_diagnostics_lora_kl_without_beta(peaked_model_dir, tmp_path):
    """LoRA with beta 0: kl/k1 and kl/k3 every diagnostics.kl_every steps, from one reference
    forward with the adapter disabled (the policy has moved by step 2); policy/clipfrac is
    the sum of the two sides; gold/mean (here the proxy itself), completions/distinct_2 and
    samples.jsonl. A full fine-tune with beta 0 has no reference: no kl/* at all."""
    out = _run(peaked_model_dir, tmp_path / "run", "--train.max_steps=3", "--model.lora.r=4",
               f"--rewards.gold={__name__}:space_fraction", "--run.eval_generations=2",
               "--diagnostics.kl_every=2")
    h1, h2, h3 = out["history"]
    assert "kl/k1" not in h1 and "kl/k1" not in h3  # every 2 steps: step 2 only
    assert h2["kl/k3"] > 1e-3 and h2["kl/k1"] != 0.0
    for h in (h1, h2, h3):
        assert h["gold/mean"] == pytest.approx(h["reward/space_fraction/mean"])
        assert h["policy/clipfrac"] == h["policy/clipfrac_low"] + h["policy/clipfrac_high"]
        assert 0.0 < h["completions/distinct_2"] <= 1.0
    samples = [json.loads(s) for s in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 3, 3]
    assert all(s["gold"] == pytest.approx(s["reward"]) for s in samples)
    full = _run(peaked_model_dir, tmp_path / "full", "--train.max_steps=1")
    assert not any(k.startswith("kl/") for k in full["history"][0])


# --- user groups (segments): own rewards, per-group metrics, fairness ---------------------------


def ones(prompts, completions, **columns):
    """Toy reward: 1.0 for every completion."""
    return [1.0] * len(completions)


def half_spaces(prompts, completions, **columns):
    """Toy reward: 0.5 + half the space fraction (higher than `space_fraction`, but varies)."""
    return [0.5 + 0.5 * s for s in space_fraction(prompts, completions)]


def _group_rows(tmp_path, groups=("a", "b", "a", "b")):
    train = [{"prompt": f"Tell me about {w}.", "group": g}
             for w, g in zip(("cats", "dogs", "rain", "tea"), groups)]
    held = [{"prompt": f"Say something about {w}.", "group": g}
            for w, g in zip(("snow", "maps"), ("a", "b"))]
    for name, rows in (("train.jsonl", train), ("held.jsonl", held)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train, [f"--data.path={tmp_path / 'train.jsonl'}",
                   f"--data.eval_path={tmp_path / 'held.jsonl'}", "--run.eval_generations=2"]


def test_group_rewards_route_rows_and_metrics(peaked_model_dir, tmp_path):
    """Group a is scored by `ones`, b by `space_fraction` (also the gold): every step a's mean
    reward is exactly 1, b's equals its own gold mean, and reward/mean is the rows' mix of the
    two; per-group length and KL (beta > 0) are logged, and the held-out metrics per group."""
    train, data = _group_rows(tmp_path)
    out = _run(peaked_model_dir, tmp_path / "run", *data, "--train.max_steps=3",
               f"--grpo.group_rewards={{a: [{__name__}:ones], b: [{__name__}:space_fraction]}}",
               f"--rewards.gold={__name__}:space_fraction", "--grpo.beta=0.05")
    for step, h in enumerate(out["history"]):
        prompts = grpo.step_items(train, step, 2, 0)
        frac_a = sum(p["group"] == "a" for p in prompts) / 2
        assert h.get("group/a/reward", 1.0) == 1.0
        if frac_a < 1:
            assert h["group/b/reward"] == pytest.approx(h["group/b/gold"])
            assert h["reward/mean"] == pytest.approx(frac_a + (1 - frac_a) * h["group/b/reward"])
        for g, share in (("a", frac_a), ("b", 1 - frac_a)):
            assert (f"group/{g}/length" in h) == (share > 0) == (f"group/{g}/kl" in h)
            assert f"group/{g}/weight" not in h  # fairness is off
    assert out["history"][0].get("group/a/kl", out["history"][0].get("group/b/kl")) \
        == pytest.approx(0.0, abs=1e-4)  # before any update the policy is the reference
    ev = out["eval_after"]
    assert ev["eval/group/a/reward"] == 1.0
    assert ev["eval/group/b/reward"] == pytest.approx(ev["eval/group/b/gold"])
    assert ev["eval/reward"] == pytest.approx((1.0 + ev["eval/group/b/reward"]) / 2)


def test_group_fairness_weights_lagging_group(peaked_model_dir, tmp_path, monkeypatch):
    """Group a (space_fraction) lags group b (0.5 + half of it). With group DRO its weight rises
    above 1, and each row's advantage is the plain one times its group's factor
    c_g = w_g N / sum_k n_k w_k (the step's N = 32 rows, 16 per group). (Resumed, the weights
    included: tests/recipes/test_resume.py.)"""
    _, data = _group_rows(tmp_path)
    rewards = (f"--grpo.group_rewards={{a: [{__name__}:space_fraction], "
               f"b: [{__name__}:half_spaces]}}")
    extra = (*data, rewards, "--grpo.prompts_per_step=4", "--train.max_steps=1",
             "--run.eval_generations=0")
    seen = []
    real_mb = grpo.micro_batches
    monkeypatch.setattr(grpo, "micro_batches", lambda r, a, *rest: seen.append(a.clone())
                        or real_mb(r, a, *rest))
    plain = _run(peaked_model_dir, tmp_path / "plain", *extra)
    fair_args = (*extra, "--grpo.group_fairness=dro", "--grpo.group_step_size=2.0")
    full = _run(peaked_model_dir, tmp_path / "full", *fair_args)
    h = full["history"][0]
    assert h["group/a/reward"] < h["group/b/reward"] and h["group/a/weight"] > 1.0
    assert h["group/a/weight"] + h["group/b/weight"] == pytest.approx(2.0)
    factors = {round(w * 32 / (16 * h["group/a/weight"] + 16 * h["group/b/weight"]), 5)
               for w in (h["group/a/weight"], h["group/b/weight"])}  # K w_g: the same scale
    ratio = seen[1][seen[0] != 0] / seen[0][seen[0] != 0]  # step 1: same samples, weighted
    assert {round(x, 5) for x in ratio.tolist()} == factors
    assert plain["history"][0]["group/a/reward"] == h["group/a/reward"]


def test_segments_task_and_group_config_errors(peaked_model_dir, tmp_path):
    """grpo.task=segments: rows of groups explain and terse, each scored by its own rewards
    (arithmetic + worked at 0.5 each; terse), logged per group in training and held out. Bad
    group settings are errors that name the key."""
    out = _run(peaked_model_dir, tmp_path / "seg", "--grpo.task=segments", "--train.max_steps=1",
               "--grpo.task_size=16", "--run.eval_generations=4")
    h, ev = out["history"][0], out["eval_after"]
    seen = {k.split("/")[1] for k in h if k.startswith("group/")}
    assert seen and seen <= {"explain", "terse"}
    for g in seen:
        assert {f"group/{g}/reward", f"group/{g}/length"} <= set(h)
    assert {"reward/terse/mean", "reward/worked/mean", "reward/arithmetic/mean"} <= set(h)
    for g in ("explain", "terse"):
        assert {f"eval/group/{g}/reward", f"eval/group/{g}/accuracy"} <= set(ev)
    with pytest.raises(ConfigError, match="grpo.task must be one of arithmetic, segments"):
        _run(peaked_model_dir, tmp_path / "x", "--grpo.task=poems")
    with pytest.raises(ConfigError, match="group_fairness=dro needs prompts of at least 2"):
        _run(peaked_model_dir, tmp_path / "x", "--grpo.group_fairness=dro")
    with pytest.raises(ConfigError, match="grpo.group_fairness must be one of none, dro"):
        _run(peaked_model_dir, tmp_path / "x", "--grpo.group_fairness=worst")
    with pytest.raises(ConfigError, match="grpo.group_rewards names group.*poets.*explain, terse"):
        _run(peaked_model_dir, tmp_path / "x", "--grpo.task=segments",
             "--grpo.group_rewards.poets=[format]")
    with pytest.raises(ConfigError, match="one weight per function"):
        _run(peaked_model_dir, tmp_path / "x", "--grpo.task=segments",
             "--grpo.group_rewards.terse=[terse]", "--grpo.group_reward_weights.terse=[1, 2]")
