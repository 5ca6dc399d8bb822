"""DPO family end to end on a tiny model: every loss widens the reward margin, reference log-probs
are cached (and equal the base model's under LoRA), group-robust weights move toward the worse
group, and one stacked forward equals two (resume: test_resume.py; golden curves:
test_golden.py)."""

import json
from dataclasses import replace

import pytest
import torch

from tether.config import DataConfig, DPOConfig, ModelConfig, PreferenceConfig, load_config
from tether.data.collate import pad_collate
from tether.data.preference import tokenize_preference_rows
from tether.engine.generate import SamplingParams, TorchBackend, encode_prompt
from tether.engine.logprobs import CausalLMLogps
from tether.engine.models import load_causal_lm
from tether.errors import ConfigError
from tether.recipes import dpo

ROWS = [
    {"prompt": "Sky colour?", "chosen": " blue", "rejected": " green", "group": "easy"},
    {"prompt": "Grass colour?", "chosen": " green", "rejected": " purple", "group": "easy"},
    {"prompt": "Two plus two?", "chosen": " four", "rejected": " five", "group": "easy"},
    {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome", "group": "easy"},
    {"prompt": "Opposite of hot?", "chosen": " cold", "rejected": " warm", "group": "easy"},
]
UNPAIRED = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in ROWS] + [
    {"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in ROWS[:2]]
# Contradictory pairs (each answer both chosen and rejected for one prompt): no policy separates
# them, so this group's loss stays near log 2. (Pairs with chosen == rejected would be dropped.)
COINS = [{"prompt": "Heads or tails?", "chosen": f" {a}", "rejected": f" {b}", "group": "coin"}
         for a, b in [("heads", "tails"), ("tails", "heads")] * 2]


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
                "optim/grad_norm", "timing/update", "rewards/accuracy/easy"):
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


def test_reference_scores_only_the_items_the_run_uses(tiny_model_dir, tmp_path, monkeypatch):
    """2 steps of 4 on 16 train pairs use 8 of them: only those (and the eval pairs) are scored;
    a longer run then scores just the ones the cache lacks, and its values for the first 8 are
    the cached ones."""
    rows = [dict(r, prompt=f"{r['prompt']} ({i})") for i in range(4) for r in ROWS]  # 20 rows
    data = _write(tmp_path / "pref.jsonl", rows)
    scored = []
    real = dpo.reference_logps

    def counting(policy, items, **kw):
        scored.append(len(items))
        return real(policy, items, **kw)

    monkeypatch.setattr(dpo, "reference_logps", counting)
    short = _run(tiny_model_dir, tmp_path / "a", data, "--train.max_steps=2")
    assert scored == [8 + 4]  # 16 train pairs, 4 eval pairs
    used = ~torch.isnan(short["ref_logps"][:, 0])
    assert used.sum() == 12
    long = _run(tiny_model_dir, tmp_path / "b", data, "--train.max_steps=8")  # 2 epochs
    assert scored == [12, 8]
    torch.testing.assert_close(long["ref_logps"][used], short["ref_logps"][used], atol=0, rtol=0)
    assert not torch.isnan(long["ref_logps"]).any()


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
    again, _ = dpo.score_reference(cfg, out["policy"], items, list(range(len(items))),
                                   tmp_path / "unused.safetensors",
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
    data = _write(tmp_path / "pref.jsonl", ROWS[:4] + COINS + [ROWS[4]])
    out = _run(tiny_model_dir, tmp_path / "run", data, "--dpo.group_robust=true",
               "--dpo.group_step_size=2.0", "--dpo.beta=0.5", "--train.batch_size=8",
               "--train.micro_batch_size=4", "--data.eval_fraction=0.1", "--train.max_steps=6")
    weights = dict(zip(out["groups"], out["group_weights"].tolist()))
    assert weights["coin"] > weights["easy"] + 0.05, weights
    logged = _metrics(tmp_path / "run", "group_weights/coin")
    assert logged[6] == pytest.approx(weights["coin"])


def test_truncated_rows_are_printed_and_logged(tiny_model_dir, tmp_path, capsys):
    rows = [dict(r, rejected=r["rejected"] + " and then a far longer ending") for r in ROWS]
    _run(tiny_model_dir, tmp_path / "run", _write(tmp_path / "pref.jsonl", rows),
         "--data.max_length=10", "--train.max_steps=1")
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["data/truncated_rows"] == 5  # 4 train + 1 held out
    tokens = first["data/truncated_tokens"]
    assert tokens > 5
    assert (f"data.truncation cut 5 of 5 rows to data.max_length=10 ({tokens} tokens dropped "
            "from their completions)") in capsys.readouterr().out


def _uneven_pairs(tokenizer) -> list:
    """Two tokenised pairs: the first with a longer chosen, the second with a longer prompt."""
    from tether.data.preference import tokenize_pair

    rows = [dict(ROWS[0], chosen=" a much longer chosen answer here"),
            dict(ROWS[1], prompt=ROWS[1]["prompt"] + " and a longer prompt than the first")]
    return [tokenize_pair(r, tokenizer, max_length=64, truncation=False, source="t", row_index=i)
            for i, r in enumerate(rows, 1)]


def test_single_forward_equals_two_forwards(tiny_model_dir, default_tokenizer):
    """Stacking chosen and rejected with their prompt run once (left-padded prompts of different
    lengths, completions right-padded, lm_head on the completion columns only) gives each
    sequence the log-probs of plain right-padded forwards of the chosen and the rejected apart;
    the reference pass (same layout) agrees with them too."""
    policy = CausalLMLogps(load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir)))).eval()
    pairs = _uneven_pairs(default_tokenizer)
    pad = default_tokenizer.pad_token_id
    batch = dpo.collate_preference(pairs, pad, ["easy"])
    prompt_lens = [sum(1 for m in p.chosen.loss_mask if not m) for p in pairs]
    assert batch.prompt_len == max(prompt_lens) and len(set(prompt_lens)) == 2  # left-padded
    with torch.no_grad():
        together, _ = dpo.sequence_logps(policy, batch.input_ids, batch.attention_mask,
                                         batch.loss_mask, prompt_len=batch.prompt_len,
                                         share_prompts=True)
        apart = []
        for side in (0, 1):
            b = pad_collate([p.sequences[side] for p in pairs], pad)
            apart.append(dpo.sequence_logps(policy, b.input_ids, b.attention_mask, b.loss_mask)[0])
    torch.testing.assert_close(together, torch.cat(apart), atol=1e-5, rtol=1e-5)
    ref = dpo.reference_logps(policy, pairs, pad_id=pad, micro_batch_size=2,
                              device=torch.device("cpu"), precision="fp32")  # (2, 2)
    torch.testing.assert_close(ref, torch.stack(apart, dim=1), atol=1e-5, rtol=1e-5)


def test_padding_to_a_multiple_keeps_the_log_probs(tiny_model_dir, default_tokenizer):
    """data.pad_to_multiple_of = 8: the longer prompt's P columns become the next multiple of 8
    (more left padding), the completion columns a multiple of 8 (more right padding), and trim
    keeps that multiple; the extra columns are masked padding, so log-probs equal those of the
    unpadded layout (fp32, to rounding), the reference pass's too."""
    from tether.data.preference import trim

    policy = CausalLMLogps(load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir)))).eval()
    pairs = _uneven_pairs(default_tokenizer)
    pad = default_tokenizer.pad_token_id
    plain = dpo.collate_preference(pairs, pad, ["easy"])
    padded = dpo.collate_preference(pairs, pad, ["easy"], multiple=8)
    P, T = padded.prompt_len, padded.input_ids.shape[1]
    assert P == -(-plain.prompt_len // 8) * 8 and P > plain.prompt_len and (T - P) % 8 == 0
    assert padded.attention_mask.sum() == plain.attention_mask.sum()
    ids, attn, loss = trim(padded.input_ids[:2], padded.attention_mask[:2], padded.loss_mask[:2],
                           prompt_len=P, multiple=8)  # the chosen rows only
    assert ids.shape[1] - P == 8 * -(-(int(attn.any(0).nonzero().max()) + 1 - P) // 8)
    with torch.no_grad():
        want, _ = dpo.sequence_logps(policy, plain.input_ids, plain.attention_mask,
                                     plain.loss_mask, prompt_len=plain.prompt_len,
                                     share_prompts=True)
        got, _ = dpo.sequence_logps(policy, padded.input_ids, padded.attention_mask,
                                    padded.loss_mask, prompt_len=P, share_prompts=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    ref = dpo.reference_logps(policy, pairs, pad_id=pad, micro_batch_size=2,
                              device=torch.device("cpu"), precision="fp32", multiple=8)
    torch.testing.assert_close(ref, want.view(2, 2).T, atol=1e-5, rtol=1e-5)


def test_padding_to_a_multiple_gives_the_same_run(tiny_model_dir, tmp_path):
    """The recipe with data.pad_to_multiple_of = 16 (the default) follows the unpadded loss
    curve (0; fp32, the padding columns are masked); a negative multiple is refused by name."""
    data = _write(tmp_path / "pref.jsonl", ROWS * 2)
    plain = _run(tiny_model_dir, tmp_path / "plain", data, "--dpo.beta=0.5",
                 "--data.pad_to_multiple_of=0")["losses"]
    padded = _run(tiny_model_dir, tmp_path / "pad", data, "--dpo.beta=0.5",
                  "--data.pad_to_multiple_of=16")["losses"]
    assert padded == pytest.approx(plain, rel=1e-4, abs=1e-6)
    with pytest.raises(ConfigError, match="data.pad_to_multiple_of"):
        _run(tiny_model_dir, tmp_path / "bad", data, "--data.pad_to_multiple_of=-1")


def test_pairs_without_a_shared_first_token_are_right_padded(default_tokenizer):
    """A standard row with no prompt: chosen and rejected differ from their first token, so
    nothing is shared (P = 0) and the rows are plain right-padded sequences."""
    from tether.data.preference import tokenize_pair

    pair = tokenize_pair({"chosen": "Yes indeed", "rejected": "No"}, default_tokenizer,
                         max_length=64, truncation=False, source="t", row_index=1)
    batch = dpo.collate_preference([pair], default_tokenizer.pad_token_id, [""])
    assert batch.prompt_len == 0
    assert batch.input_ids[0, :len(pair.chosen.input_ids)].tolist() == pair.chosen.input_ids
    assert batch.input_ids[1, :len(pair.rejected.input_ids)].tolist() == pair.rejected.input_ids


def test_gradient_checkpointing_gives_the_same_run(tiny_model_dir, tmp_path):
    """With train.gradient_checkpointing transformers drops the KV cache, so each row runs its
    own prompt instead of sharing it: the same maths, so the same loss curve (to rounding)."""
    data = _write(tmp_path / "pref.jsonl", ROWS * 2)
    plain = _run(tiny_model_dir, tmp_path / "plain", data, "--dpo.beta=0.5")["losses"]
    ckpt = _run(tiny_model_dir, tmp_path / "ckpt", data, "--dpo.beta=0.5",
                "--train.gradient_checkpointing=true")["losses"]
    assert ckpt == pytest.approx(plain, rel=1e-4, abs=1e-6)
    assert plain[-1] < plain[0]


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_micro_batching_does_not_change_the_step(loss, tiny_model_dir, tmp_path):
    """The loss is a sum over pairs divided by the step's pair count: 2 micro-batches of 2
    pairs give the same losses (and so the same update) as 1 micro-batch of 4. For KTO this also
    needs the reference point z estimated once over the whole step, not per micro-batch."""
    rows = ROWS if loss == "dpo" else UNPAIRED  # mostly desirable: the policy's z rises above 0
    data = _write(tmp_path / "pref.jsonl", rows)
    _run(tiny_model_dir, tmp_path / "one", data, "--train.micro_batch_size=4",
         "--train.max_steps=3", "--dpo.group_robust=true", "--dpo.group_step_size=1.0",
         f"--dpo.loss={loss}")
    _run(tiny_model_dir, tmp_path / "two", data, "--train.micro_batch_size=2",
         "--train.max_steps=3", "--dpo.group_robust=true", "--dpo.group_step_size=1.0",
         f"--dpo.loss={loss}")
    if loss == "kto":
        z_one, z_two = _metrics(tmp_path / "one", "kto/kl"), _metrics(tmp_path / "two", "kto/kl")
        assert z_one[3] > 0 and z_two == pytest.approx(z_one, rel=1e-5, abs=1e-7)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert one[3] != one[1]  # the model moved
    for step in (1, 2, 3):
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step


def test_unset_beta_takes_the_losses_own_default():
    """dpo.beta unset: SimPO trains at its paper's beta 2.0 (gamma 0.5), DPO at 0.1; an explicit
    beta wins; the other coefficients of a loss are untouched by beta."""
    objective = lambda *o: dpo.build_objective(load_config(DPOConfig, None, list(o)).dpo)  # noqa: E731
    assert objective("--dpo.loss=simpo").coefficients == {"beta": 2.0, "gamma": 0.5}
    assert objective("--dpo.loss=dpo").coefficients == {"beta": 0.1}
    assert objective().coefficients == {"beta": 0.1}
    assert objective("--dpo.loss=simpo", "--dpo.beta=2.5").coefficients == {"beta": 2.5,
                                                                            "gamma": 0.5}
    assert objective("--dpo.loss=kto", "--dpo.beta=0.3").coefficients == {
        "beta": 0.3, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    assert objective("--dpo.loss=simpo").summary == "simpo, beta=2, gamma=0.5"


def test_bad_loss_name_is_config_error(tiny_model_dir, tmp_path):
    from tether.errors import ConfigError

    data = _write(tmp_path / "pref.jsonl", ROWS)
    with pytest.raises(ConfigError, match="dpo.loss must be one of"):
        _run(tiny_model_dir, tmp_path / "run", data, "--dpo.loss=dpoo")
    with pytest.raises(ConfigError, match="label_smoothing"):
        _run(tiny_model_dir, tmp_path / "run", data, "--dpo.loss=cdpo")


def _unpaired_items(tok, n_rows=4):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0}
            for i, r in enumerate(ROWS[:n_rows])]
    return tokenize_preference_rows(list(enumerate(rows, 1)), tok, DataConfig(max_length=32),
                                    "t", unpaired=True)


def test_kto_reference_point_is_the_global_mean_over_mismatched_sequences(tiny_model_dir,
                                                                          default_tokenizer):
    """z before clamping = mean over *all* mismatched sequences of the step of (policy - ref)
    summed log-probs. With micro-batches of 3 and 1 examples the mean of per-micro-batch means
    differs from it; kto_kl must give the global one, without gradients."""
    tok = default_tokenizer
    policy = CausalLMLogps(load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir))))
    items = _unpaired_items(tok)
    for i, it in enumerate(items):
        it.ref = (0.0, -30.0 - 10.0 * i)  # made-up reference log-probs of (example, KL sequence)
    with torch.no_grad():  # (4,) policy log-probs, one right-padded forward of its own each
        kl_logps = torch.cat([dpo.sequence_logps(policy, b.input_ids, b.attention_mask,
                                                 b.loss_mask)[0]
                              for b in (pad_collate([it.kl_example], 2) for it in items)])
    diffs = kl_logps - torch.tensor([it.ref[1] for it in items])
    batches = [dpo.collate_preference(items[:3], 2, [""]), dpo.collate_preference(items[3:], 2, [""])]
    z = dpo.kto_kl(policy, batches, torch.device("cpu"), "fp32")
    assert not z.requires_grad
    torch.testing.assert_close(z, diffs.mean(), atol=1e-4, rtol=1e-5)
    per_micro_batch = (diffs[:3].mean() + diffs[3:].mean()) / 2
    assert abs(per_micro_batch - diffs.mean()) > 1.0  # the test can tell them apart
    # and the loss of a batch uses that z (clamped at 0 inside kto_loss), not its own rows
    batch = replace(batches[0], kl=z)
    objective = dpo.build_objective(PreferenceConfig(loss="kto", beta=0.5))
    _, m = dpo.preference_loss(policy, batch, objective=objective, group_weights=None, n_groups=1)
    assert m["kl"] / 3 == pytest.approx(max(z.item(), 0.0), rel=1e-5)


def test_kto_mismatched_sequences_pair_each_prompt_with_another_completion(default_tokenizer):
    items = _unpaired_items(default_tokenizer)
    completions = [it.example.input_ids[it.example.loss_mask.index(True):] for it in items]
    for it in items:
        start = it.kl_example.loss_mask.index(True)
        assert it.kl_example.input_ids[:start] == it.example.input_ids[:it.example.loss_mask.index(True)]
        kl_completion = it.kl_example.input_ids[start:]
        assert kl_completion in completions and kl_completion != completions[items.index(it)]



def test_heldout_generations_score_and_kl(tiny_model_dir, default_tokenizer, monkeypatch):
    """eval/sentiment is the mean VADER score of completions sampled from the policy, and kl/k1
    the mean of log pi(y|x) - log ref(y|x) over them, checked against full-logit log-probs of an
    independently loaded reference; sampling leaves the training RNG untouched."""
    from tether.data.tasks import sentiment

    monkeypatch.setattr(sentiment, "MAX_NEW_TOKENS", 12)  # short: seconds, not minutes
    tok = default_tokenizer
    cfg = load_config(DPOConfig, None, [f"--model.name_or_path={tiny_model_dir}",
                                        "--train.precision=fp32", "--train.micro_batch_size=2"])
    policy = CausalLMLogps(load_causal_lm(cfg.model))
    prompts = [p["prompt"] for p in sentiment.heldout_prompts(3)]
    rng = torch.get_rng_state()
    assert dpo.heldout_generations(cfg, policy, tok, prompts, initial=True)[0]["kl/k1"] == 0.0
    assert torch.equal(torch.get_rng_state(), rng)  # sampling forked the RNG: resume stays exact
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "train" the policy: it drifts away from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    got = dpo.heldout_generations(cfg, policy, tok, prompts, initial=False)[0]
    rollout = TorchBackend(policy, tok, precision="fp32").generate(  # the same draw, by hand
        [encode_prompt(tok, p) for p in prompts],
        SamplingParams(max_new_tokens=sentiment.MAX_NEW_TOKENS, temperature=1.0),
        generator=torch.Generator().manual_seed(cfg.train.seed + 7919))
    ref = load_causal_lm(cfg.model).eval()

    def full_logits_logp(lm, prompt_ids, completion_ids):
        ids = torch.tensor([prompt_ids + completion_ids])
        with torch.no_grad():
            logps = torch.log_softmax(lm(ids).logits[0, :-1].float(), -1)
        per_token = logps.gather(-1, ids[0, 1:, None]).squeeze(-1)
        return per_token[len(prompt_ids) - 1:].sum().item()

    kl = []
    for row in range(3):
        p = rollout.prompt_ids[row][rollout.prompt_mask[row]].tolist()
        c = rollout.completion_ids[row][rollout.completion_mask[row]].tolist()
        assert 1 <= len(c) <= sentiment.MAX_NEW_TOKENS
        kl.append(full_logits_logp(policy.causal_lm().eval(), p, c) - full_logits_logp(ref, p, c))
    assert max(abs(k) for k in kl) > 0.1  # the drift is visible
    assert got["kl/k1"] == pytest.approx(sum(kl) / 3, abs=1e-3, rel=1e-4)
    assert got["eval/sentiment"] == pytest.approx(
        sum(sentiment.sentiment_score(t) for t in rollout.texts) / 3, abs=1e-9)


def test_builtin_set_run_logs_heldout_sentiment_and_kl(tiny_model_dir, tmp_path, monkeypatch):
    """No data.path: the built-in sentiment pairs, and eval/sentiment + kl/k1 before (KL 0) and
    after training on held-out prompts (a few short samples here)."""
    from tether.data.tasks import sentiment

    monkeypatch.setattr(sentiment, "MAX_NEW_TOKENS", 6)
    overrides = [o for o in _overrides(tiny_model_dir, tmp_path / "run", "x")
                 if not o.startswith("--data.path")]
    cfg = load_config(DPOConfig, None, overrides + [  # few pairs: ~80-token rows, 49k vocab
        "--train.max_steps=2", "--train.batch_size=2", "--data.max_length=128",
        "--data.eval_fraction=0.01", "--run.eval_generations=4"])
    assert cfg.data.path is None
    out = dpo.run(cfg)
    assert len(out["items"]) == len(sentiment.preference_rows())
    before, after = out["generations_before"], out["generations_after"]
    assert before["kl/k1"] == 0.0 and after["kl/k1"] != 0.0
    assert -1 <= before["eval/sentiment"] <= 1 and -1 <= after["eval/sentiment"] <= 1
    logged = _metrics(tmp_path / "run", "kl/k1")
    assert logged == {0: 0.0, 2: pytest.approx(after["kl/k1"])}


def word_count(prompts, completions, **columns):
    """A gold reward for the tests: words per completion / 10."""
    return [len(c.split()) / 10 for c in completions]


def test_online_diagnostics_with_gold(tiny_model_dir, tmp_path, monkeypatch):
    """rewards.gold with user pairs: completions sampled for the held-out pairs' prompts before,
    every rewards.gold_every steps and after, with gold/mean, kl/k1 (0 before any
    update), kl/k3, policy/entropy, completions/*; samples.jsonl before and after; the watcher's
    proxy is rewards/margin."""
    from tether.data.tasks import sentiment

    monkeypatch.setattr(sentiment, "MAX_NEW_TOKENS", 6)
    data = _write(tmp_path / "pref.jsonl", ROWS)
    _run(tiny_model_dir, tmp_path / "run", data, "--train.max_steps=2",
         f"--rewards.gold={__name__}:word_count", "--rewards.gold_every=1",
         "--run.eval_generations=2")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gold = [x for x in lines if "gold/mean" in x]
    assert [x["step"] for x in gold] == [0, 1, 2, 2]  # before, each step, after
    for x in gold:
        for key in ("kl/k1", "kl/k3", "policy/entropy", "completions/mean_length",
                    "completions/distinct_2"):
            assert key in x, key
        assert 1 <= x["completions/mean_length"] <= 6 and "eval/sentiment" not in x
    assert gold[0]["kl/k1"] == 0.0 and gold[0]["kl/k3"] == 0.0 and gold[-1]["kl/k3"] > 0
    assert "rewards/margin" in gold[1]
    samples = [json.loads(s) for s in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 2]
    assert all(set(s) == {"step", "prompt", "completion", "gold"} for s in samples)
    assert any(r["prompt"] in samples[0]["prompt"] for r in ROWS)
    assert samples[0]["gold"] == len(samples[0]["completion"].split()) / 10
