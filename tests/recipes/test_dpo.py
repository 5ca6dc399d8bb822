"""DPO family end to end on a tiny model: every loss widens the reward margin, reference log-probs
are cached (and equal the base model's under LoRA), group-robust weights move toward the worse
group, one stacked forward equals two, and resume equals uninterrupted."""

import json

import pytest
import torch

from tether.config import DPOConfig, ModelConfig, load_config
from tether.data.collate import pad_collate
from tether.engine import checkpoint
from tether.engine.logprobs import CausalLMLogps
from tether.engine.models import load_causal_lm
from tether.recipes import dpo

ROWS = [
    {"prompt": "Sky colour?", "chosen": " blue", "rejected": " green", "group": "easy"},
    {"prompt": "Grass colour?", "chosen": " green", "rejected": " purple", "group": "easy"},
    {"prompt": "Two plus two?", "chosen": " four", "rejected": " five", "group": "easy"},
    {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome", "group": "easy"},
    {"prompt": "Opposite of hot?", "chosen": " cold", "rejected": " warm", "group": "easy"},
]
# Chosen == rejected: the policy cannot separate them, so this group's loss stays at log 2.
TIES = [{"prompt": f"Tie {i}?", "chosen": f" same {i}", "rejected": f" same {i}", "group": "tie"}
        for i in range(4)]


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))


def _overrides(model_dir, out_dir, data, *extra):
    return [f"--model.name_or_path={model_dir}", f"--run.output_dir={out_dir}",
            f"--data.path={data}", "--train.max_steps=5", "--train.batch_size=4",
            "--train.micro_batch_size=2", "--train.lr=3e-2", "--train.warmup_ratio=0.0",
            "--train.schedule=constant", "--train.precision=fp32", "--data.max_length=32",
            "--data.eval_fraction=0.2", "--run.progress=false", "--run.tensorboard=false", *extra]


def _run(model_dir, out_dir, data, *extra):
    return dpo.run(load_config(DPOConfig, None, _overrides(model_dir, out_dir, data, *extra)))


def _metrics(run_dir, key="loss/dpo"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


LOSS_ARGS = {
    "dpo": ["--dpo.beta=0.5"],
    "cdpo": ["--dpo.beta=0.5", "--dpo.label_smoothing=0.1"],
    "robust": ["--dpo.beta=0.5", "--dpo.label_smoothing=0.1"],
    "ipo": ["--dpo.beta=0.5"],
    "hinge": ["--dpo.beta=0.5"],
    "simpo": ["--dpo.beta=2.0", "--dpo.simpo_gamma=0.5"],
    "orpo": ["--dpo.orpo_lambda=1.0"],
    "kto": ["--dpo.beta=0.5"],
}


@pytest.mark.parametrize("loss", list(LOSS_ARGS))
def test_reward_margin_grows(loss, tiny_model_dir, tmp_path):
    """Four fixed training pairs (batch = the whole train split): the implicit reward margin
    chosen - rejected rises from its first-step value."""
    data = _write(tmp_path / "pref.jsonl", ROWS)
    out = _run(tiny_model_dir, tmp_path / "run", data, f"--dpo.loss={loss}", *LOSS_ARGS[loss])
    margins = out["margins"]
    assert len(margins) == 5 and all(map(torch.isfinite, torch.tensor(margins)))
    assert margins[-1] > margins[0] + 1e-3, margins
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    for key in ("loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/accuracy",
                "rewards/margin", "logps/chosen", "logps/rejected", "optim/lr",
                "optim/grad_norm", "time/step", "rewards/accuracy/easy"):
        assert key in logged, key


def test_reference_cached_and_reused(tiny_model_dir, tmp_path, monkeypatch):
    data = _write(tmp_path / "pref.jsonl", ROWS)
    first = _run(tiny_model_dir, tmp_path / "a", data, "--train.max_steps=1")
    files = list((tmp_path / "cache" / "ref_logps").glob("*.safetensors"))
    assert len(files) == 1

    def no_reference_forward(*args, **kwargs):
        raise AssertionError("the reference was scored again instead of read from the cache")

    monkeypatch.setattr(dpo, "reference_logps", no_reference_forward)
    second = _run(tiny_model_dir, tmp_path / "b", data, "--train.max_steps=1")
    torch.testing.assert_close(second["ref_logps"], first["ref_logps"], atol=0, rtol=0)
    # different data -> a different key -> scored again (and here: the patched scorer raises)
    with pytest.raises(AssertionError, match="scored again"):
        _run(tiny_model_dir, tmp_path / "c", _write(tmp_path / "other.jsonl", ROWS[::-1]),
             "--train.max_steps=1")
    # reference-free losses never score a reference
    _run(tiny_model_dir, tmp_path / "d", data, "--train.max_steps=1", "--dpo.loss=simpo")


def _score(model, items, tok):
    return dpo.reference_logps(model, items, pad_id=tok.pad_token_id, micro_batch_size=3,
                               device=torch.device("cpu"), precision="fp32")


def test_lora_reference_is_base_model(tiny_model_dir, tmp_path):
    """With LoRA the reference is the policy with its adapter disabled: equal to the base model's
    log-probs even once the adapter has trained (no second copy of the model)."""
    data = _write(tmp_path / "pref.jsonl", ROWS)
    overrides = _overrides(tiny_model_dir, tmp_path / "run", data, "--model.lora.r=4",
                           "--train.max_steps=2", "--dpo.cache_reference=false")
    out = dpo.run(load_config(DPOConfig, None, overrides))
    items, tok = out["items"], out["tokenizer"]
    base = CausalLMLogps(load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir)))).eval()
    want = _score(base, items, tok)
    torch.testing.assert_close(out["ref_logps"], want, atol=1e-5, rtol=1e-5)
    assert (_score(out["policy"], items, tok) - want).abs().max() > 1e-3  # the adapter trained
    cfg = load_config(DPOConfig, None, overrides)
    again, _ = dpo.score_reference(cfg, out["policy"], items, tmp_path / "unused.safetensors",
                                   pad_id=tok.pad_token_id, device=torch.device("cpu"),
                                   precision="fp32")  # trained adapter, disabled for the reference
    torch.testing.assert_close(again, want, atol=1e-5, rtol=1e-5)


def test_separate_reference_model(tiny_model_dir, tmp_path, default_tokenizer):
    """dpo.ref_model: the reference log-probs are that model's, not the policy's."""
    from tether.engine.models import tiny_llama

    ref_dir = tmp_path / "ref-model"
    tiny_llama(vocab_size=len(default_tokenizer), tie=True, seed=1,
               pad_token_id=default_tokenizer.pad_token_id).save_pretrained(ref_dir)
    data = _write(tmp_path / "pref.jsonl", ROWS)
    out = _run(tiny_model_dir, tmp_path / "run", data, f"--dpo.ref_model={ref_dir}",
               "--train.max_steps=1")
    ref = CausalLMLogps(load_causal_lm(ModelConfig(name_or_path=str(ref_dir)))).eval()
    torch.testing.assert_close(out["ref_logps"], _score(ref, out["items"], out["tokenizer"]),
                               atol=1e-5, rtol=1e-5)
    policy0 = CausalLMLogps(load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir)))).eval()
    assert (out["ref_logps"] - _score(policy0, out["items"], out["tokenizer"])).abs().max() > 1e-2


def test_group_robust_weights_move_to_worse_group(tiny_model_dir, tmp_path):
    data = _write(tmp_path / "pref.jsonl", ROWS[:4] + TIES + [ROWS[4]])
    out = _run(tiny_model_dir, tmp_path / "run", data, "--dpo.group_robust=true",
               "--dpo.group_step_size=2.0", "--dpo.beta=0.5", "--train.batch_size=8",
               "--train.micro_batch_size=4", "--data.eval_fraction=0.1", "--train.max_steps=6")
    weights = dict(zip(out["groups"], out["group_weights"].tolist()))
    assert weights["tie"] > weights["easy"] + 0.05, weights
    logged = _metrics(tmp_path / "run", "group_weights/tie")
    assert logged[6] == pytest.approx(weights["tie"])


def test_single_forward_equals_two_forwards(tiny_model_dir, default_tokenizer):
    """Stacking chosen and rejected (padded to a common length) gives each sequence the same
    log-probs as running chosen and rejected in separate forwards."""
    from tether.data.preference import tokenize_pair

    policy = CausalLMLogps(load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir)))).eval()
    rows = [dict(ROWS[0], chosen=" a much longer chosen answer here"), ROWS[1]]
    pairs = [tokenize_pair(r, default_tokenizer, max_length=64, truncation=False, source="t",
                           row_index=i) for i, r in enumerate(rows, 1)]
    pad = default_tokenizer.pad_token_id
    batch = dpo.collate_preference(pairs, pad, ["easy"])
    with torch.no_grad():
        together, _ = dpo.sequence_logps(policy, batch.input_ids, batch.attention_mask,
                                         batch.loss_mask)
        apart = []
        for side in (0, 1):
            b = pad_collate([p.sequences[side] for p in pairs], pad)
            apart.append(dpo.sequence_logps(policy, b.input_ids, b.attention_mask, b.loss_mask)[0])
    torch.testing.assert_close(together, torch.cat(apart), atol=1e-5, rtol=1e-5)
    assert batch.input_ids.shape[1] > min(len(p.rejected.input_ids) for p in pairs)  # padded


def test_micro_batching_does_not_change_the_step(tiny_model_dir, tmp_path):
    """The loss is a sum over pairs divided by the step's pair count: 2 micro-batches of 2
    pairs give the same losses (and so the same update) as 1 micro-batch of 4."""
    data = _write(tmp_path / "pref.jsonl", ROWS)
    _run(tiny_model_dir, tmp_path / "one", data, "--train.micro_batch_size=4",
         "--train.max_steps=3", "--dpo.group_robust=true", "--dpo.group_step_size=1.0")
    _run(tiny_model_dir, tmp_path / "two", data, "--train.micro_batch_size=2",
         "--train.max_steps=3", "--dpo.group_robust=true", "--dpo.group_step_size=1.0")
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert one[3] != one[1]  # the model moved
    for step in (1, 2, 3):
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step


def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path, monkeypatch):
    """Kill right after the step-3 checkpoint and resume: steps 4-6 match to the bit, group
    weights included."""
    data = _write(tmp_path / "pref.jsonl", ROWS * 2)
    extra = ("--run.save_every=3", "--train.max_steps=6", "--dpo.group_robust=true",
             "--dpo.group_step_size=0.5", "--data.eval_fraction=0.1", "--train.batch_size=4")
    _run(tiny_model_dir, tmp_path / "full", data, *extra)
    full = _metrics(tmp_path / "full")
    real_save = checkpoint.save

    class Killed(Exception):
        pass

    def save_then_die(*args, **kwargs):
        path = real_save(*args, **kwargs)
        if args[1] == 3:
            raise Killed
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        _run(tiny_model_dir, tmp_path / "cut", data, *extra)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # a step logged after the checkpoint
        f.write(json.dumps({"step": 4, "loss/dpo": -1.0}) + "\n")
    monkeypatch.setattr(checkpoint, "save", real_save)
    torch.manual_seed(999)
    _run(tiny_model_dir, tmp_path / "cut", data, *extra, "--run.resume=true")
    cut = _metrics(tmp_path / "cut")
    assert sorted(cut) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert cut[step] == full[step], (step, cut[step], full[step])


def test_bad_loss_name_is_config_error(tiny_model_dir, tmp_path):
    from tether.errors import ConfigError

    data = _write(tmp_path / "pref.jsonl", ROWS)
    with pytest.raises(ConfigError, match="dpo.loss must be one of"):
        _run(tiny_model_dir, tmp_path / "run", data, "--dpo.loss=dpoo")
    with pytest.raises(ConfigError, match="label_smoothing"):
        _run(tiny_model_dir, tmp_path / "run", data, "--dpo.loss=cdpo")
