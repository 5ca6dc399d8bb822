"""Online diagnostics (tether/eval/online.py): hand-derived distinct-n and trends, each warning
firing once on a constructed metrics sequence and never on a healthy one, a resumed run's
watcher (replayed from metrics.jsonl) not warning twice, samples.jsonl, and the config keys."""

import json

import pytest

from tether.config import (DiagnosticsConfig, DPOConfig, GRPOConfig, PPOConfig, RewardsConfig,
                           RLHFConfig, load_config)
from tether.engine.metrics import MetricsLogger
from tether.errors import ConfigError
from tether.eval import online
from tether.eval.online import Watcher, distinct_n, fitted_change, trend

# ------------------------------------------------------------------------------ pure maths


def test_distinct_n_hand_values():
    """texts "the cat sat", "the cat ran", "" (whitespace tokens):
      unigrams the cat sat the cat ran: 6, distinct {the, cat, sat, ran} = 4  -> 4/6 = 2/3
      bigrams (the cat) (cat sat) (the cat) (cat ran): 4, distinct 3           -> 3/4
      trigrams (the cat sat) (the cat ran): 2, distinct 2                      -> 1
      4-grams: none                                                            -> 0.0
    Corpus-level, not a mean of per-text ratios: "a a a a", "b" has 5 unigrams, 2 distinct
    -> 0.4 (the mean of 1/4 and 1/1 would be 0.625). Any whitespace splits."""
    texts = ["the cat sat", "the cat ran", ""]
    assert distinct_n(texts, 1) == pytest.approx(2 / 3)
    assert distinct_n(texts, 2) == 0.75
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(texts, 4) == 0.0
    assert distinct_n([], 2) == 0.0
    assert distinct_n(["a a a a", "b"], 1) == 0.4
    assert distinct_n(["a  b\tc\n", "a b"], 2) == pytest.approx(2 / 3)  # (a b) (b c) (a b)


def test_trend_hand_values():
    """Least-squares slope against the index. [1, 3, 2, 5]: i_mean 1.5, v_mean 2.75,
    sum (i - 1.5)(v - 2.75) = (-1.5)(-1.75) + (-0.5)(0.25) + (0.5)(-0.75) + (1.5)(2.25)
    = 2.625 - 0.125 - 0.375 + 3.375 = 5.5;  sum (i - 1.5)^2 = 2.25 + 0.25 + 0.25 + 2.25 = 5;
    slope 5.5 / 5 = 1.1. Two points: their difference. Constant, one point, none: 0."""
    import numpy as np

    assert trend([1.0, 3.0, 2.0, 5.0]) == pytest.approx(1.1)
    assert trend([1.0, 3.0, 2.0, 5.0]) == pytest.approx(np.polyfit(range(4), [1, 3, 2, 5], 1)[0])
    assert trend([3.0, 1.0]) == -2.0
    assert trend([2.0, 2.0, 2.0]) == 0.0
    assert trend([5.0]) == 0.0 and trend([]) == 0.0


def test_fitted_change_ignores_a_noisy_plateau():
    """[1, 2, 3, 4]: slope 1, change across the window 3 x 1 = 3, no scatter -> 3.
    [0, 1, 0, 0.5]: mean 0.375, sum (i - 1.5)(v - 0.375) = 0.5625 - 0.3125 - 0.1875 + 0.1875
    = 0.25, slope 0.05, change 0.15; the line 0.375 + 0.05 (i - 1.5) = [0.3, 0.35, 0.4, 0.45],
    residuals [-0.3, 0.65, -0.4, 0.05], RMS sqrt(0.675 / 4) = 0.41 > 0.15 -> 0 (no trend).
    A change under TREND_TOL (1e-3) does not count either."""
    assert fitted_change([1.0, 2.0, 3.0, 4.0]) == pytest.approx(3.0)
    assert fitted_change([4.0, 3.0, 2.0, 1.0]) == pytest.approx(-3.0)
    assert fitted_change([0.0, 1.0, 0.0, 0.5]) == 0.0
    assert fitted_change([0.0, 1e-4, 2e-4]) == 0.0


# ------------------------------------------------------------------------------ the watcher


def fired(lines, cfg=None, **kw):
    """[(step, name, message)] of the warnings a fresh watcher gives on these lines."""
    w = Watcher(cfg or DiagnosticsConfig(), **kw)
    out = []
    for step, m in lines:
        out += [(step, x.name, x.message) for x in w.observe(step, dict(m))]
    return out


def test_reward_hacking_fires_once_when_proxy_rises_and_gold_falls():
    """window 4: proxy 1, 2, 3, 4 while gold 0.8, 0.6, 0.4, 0.2 -> fires at step 4 (the window
    is full), not before and never again though the pattern goes on."""
    lines = [(s, {"reward/mean": float(s), "gold/mean": 1.0 - 0.2 * s}) for s in range(1, 9)]
    got = fired(lines)
    assert [(s, n) for s, n, _ in got] == [(4, "reward_hacking")]
    assert "steps 1-4" in got[0][2] and "reward/mean rose by 3" in got[0][2]
    assert "gold/mean fell by 0.6" in got[0][2]
    # both rising, or gold flat: nothing
    assert fired([(s, {"reward/mean": float(s), "gold/mean": 0.1 * s}) for s in range(1, 9)]) == []
    assert fired([(s, {"reward/mean": float(s), "gold/mean": 0.5}) for s in range(1, 9)]) == []


def test_reward_hacking_pairs_gold_with_the_latest_proxy():
    """DPO logs gold on evaluation lines of their own: each gold value pairs with the proxy
    (here `rewards/margin`) last logged at or before it; a gold line before any proxy is
    skipped. window 2: margins 0.1 then 0.5 while gold 0.3 then 0.1 -> fires at step 4."""
    lines = [(0, {"gold/mean": 0.9}), (1, {"rewards/margin": 0.1}), (2, {"gold/mean": 0.3}),
             (3, {"rewards/margin": 0.5}), (4, {"gold/mean": 0.1})]
    got = fired(lines, DiagnosticsConfig(window=2), proxy="rewards/margin")
    assert [(s, n) for s, n, _ in got] == [(4, "reward_hacking")]


def test_entropy_and_diversity_collapse_fire_once():
    """entropy_drop 0.3: first entropy 2.0, so below 0.6 fires (1.0 does not; 0.5 does, once).
    distinct2_min 0.5: first 0.8, so below 0.4 fires (0.5 does not; 0.3 does, once)."""
    ent = [2.0, 1.0, 0.5, 0.4, 0.1]
    d2 = [0.8, 0.5, 0.5, 0.3, 0.2]
    lines = [(s + 1, {"policy/entropy": e, "completions/distinct_2": d})
             for s, (e, d) in enumerate(zip(ent, d2))]
    got = fired(lines)
    assert [(s, n) for s, n, _ in got] == [(3, "entropy_collapse"), (4, "diversity_collapse")]
    assert "policy/entropy 0.5 is below diagnostics.entropy_drop 0.3 x its first value 2" \
        in got[0][2]
    assert fired(lines, DiagnosticsConfig(entropy_drop=0.0, distinct2_min=0.0)) == []


def test_kl_bound_fires_once_and_only_when_set():
    lines = [(1, {"kl/k1": 4.0, "kl/k3": 3.0}), (2, {"kl/k1": 4.5, "kl/k3": 6.0}),
             (3, {"kl/k1": 7.0, "kl/k3": 8.0})]
    got = fired(lines, DiagnosticsConfig(kl_max=5.0))
    assert [(s, n) for s, n, _ in got] == [(2, "kl_bound")]
    assert got[0][2].startswith("kl/k3 6 nats passed diagnostics.kl_max 5")
    assert fired(lines) == []  # kl_max 0: off


def test_a_healthy_run_warns_about_nothing():
    """Proxy and gold rise together (with noise), entropy drifts down to 0.8x, distinct-2 stays,
    KL stays under the bound, NaN entries (logged as "nan") are skipped."""
    lines = []
    for s in range(1, 21):
        noise = 0.05 * (-1) ** s
        lines.append((s, {"reward/mean": 0.1 * s + noise, "gold/mean": 0.05 * s - noise,
                          "policy/entropy": 2.0 - 0.02 * s, "completions/distinct_2": 0.7 + noise,
                          "kl/k1": 0.1 * s, "kl/k3": "nan", "loss/policy": float("nan")}))
    assert fired(lines, DiagnosticsConfig(kl_max=3.0)) == []
    hacking = [(s, {**m, "gold/mean": 1.0 - 0.05 * s}) for s, m in lines]
    assert fired(hacking, DiagnosticsConfig(kl_max=3.0, warn=False)) == []


def test_window_below_two_is_an_error():
    with pytest.raises(ConfigError, match="diagnostics.window must be >= 2"):
        Watcher(DiagnosticsConfig(window=1))


# ------------------------------------------------------------------------------ resume


class FakeLogger:
    """MetricsLogger's interface: lines into a list (and metrics.jsonl), prints into a list."""

    def __init__(self, run_dir, start_step=0):
        self.real = MetricsLogger(run_dir, total_steps=10, tensorboard=False, progress=False,
                                  start_step=start_step)
        self.printed = []

    def log(self, step, metrics):
        self.real.log(step, metrics)

    def print(self, message):
        self.printed.append(message)


def run_lines():
    """Steps 1-10: entropy collapses at step 3, reward hacking shows at step 7 (window 4 over
    the gold lines of steps 4-7: proxy rises, gold falls), KL passes 5 at step 9."""
    lines = []
    for s in range(1, 11):
        m = {"policy/entropy": 2.0 if s < 3 else 0.5, "reward/mean": 0.1 * s,
             "kl/k1": 1.0 if s < 9 else 6.0}
        if s >= 4:
            m["gold/mean"] = 1.0 - 0.1 * s
        lines.append((s, m))
    return lines


def diagnose(run_dir, lines, start_step=0):
    diag = online.Diagnostics(RewardsConfig(), DiagnosticsConfig(kl_max=5.0), run_dir,
                              start_step=start_step)
    logger = FakeLogger(run_dir, start_step)
    for step, m in lines:
        if step > start_step:
            diag.log(logger, step, dict(m))
    return logger.printed


def test_resumed_run_replays_metrics_and_does_not_warn_again(tmp_path):
    """An uninterrupted run warns three times, each once, and writes each warning into its
    line; a run killed after step 8 and resumed from it replays metrics.jsonl and warns only
    about what came after (the KL at step 9); one killed after step 5 warns about the reward
    hacking of step 7 in its second life."""
    full = diagnose(tmp_path / "full", run_lines())
    assert [p.split(":")[1].strip() for p in full] == ["entropy_collapse", "reward_hacking",
                                                       "kl_bound"]
    assert all(p.startswith("warning: ") for p in full)
    logged = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert {x["step"]: x["warnings"] for x in logged if "warnings" in x} == {
        3: ["entropy_collapse"], 7: ["reward_hacking"], 9: ["kl_bound"]}
    assert all(len(x["warning_messages"]) == 1 for x in logged if "warnings" in x)

    for kill, after in ((8, ["kl_bound"]), (5, ["reward_hacking", "kl_bound"])):
        run_dir = tmp_path / f"cut{kill}"
        diagnose(run_dir, run_lines()[:kill])
        resumed = diagnose(run_dir, run_lines(), start_step=kill)
        assert [p.split(":")[1].strip() for p in resumed] == after, kill
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == list(range(1, 11))
        assert {x["step"]: x["warnings"] for x in lines if "warnings" in x} == {
            3: ["entropy_collapse"], 7: ["reward_hacking"], 9: ["kl_bound"]}


def test_replay_skips_torn_lines_and_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kl/k1": 1}\n{"step": 2, "warnings": ["kl_bound"]}\n'
                    '{"step": 3, "kl/k1": 9}\n{"step": 4, "kl/')
    assert [x["step"] for x in online.read_metrics(path, 2)] == [1, 2]
    assert [x["step"] for x in online.read_metrics(path, 99)] == [1, 2, 3]
    assert online.read_metrics(tmp_path / "missing.jsonl", 5) == []
    w = Watcher(DiagnosticsConfig(kl_max=5.0))
    w.replay(online.read_metrics(path, 2))
    assert w.observe(3, {"kl/k1": 9.0}) == []  # fired before the kill


# ------------------------------------------------------------------------------ samples, config


def test_samples_jsonl_is_truncated_on_resume(tmp_path):
    diag = online.Diagnostics(RewardsConfig(), DiagnosticsConfig(), tmp_path, start_step=0)
    logger = FakeLogger(tmp_path)
    rows = online.sample_rows(["plain", [{"role": "system", "content": "s"},
                                         {"role": "user", "content": "last user"},
                                         {"role": "assistant", "content": "a"}]],
                              ["c1", "c2"], reward=[1, 2], gold=None)
    assert rows == [{"prompt": "plain", "completion": "c1", "reward": 1.0},
                    {"prompt": "last user", "completion": "c2", "reward": 2.0}]
    many = online.sample_rows([f"p{i}" for i in range(20)], [f"c{i}" for i in range(20)])
    assert len(many) == online.SAMPLES_KEPT == 16 and many[-1]["prompt"] == "p15"
    for step in (0, 4, 8):
        diag.log(logger, step, {}, rows)
    path = tmp_path / "samples.jsonl"
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 0, 4, 4, 8, 8]
    online.Diagnostics(RewardsConfig(), DiagnosticsConfig(), tmp_path, start_step=4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 0]
    online.Diagnostics(RewardsConfig(), DiagnosticsConfig(), tmp_path, start_step=0)
    assert path.read_text() == ""  # a fresh run starts a fresh file


def test_gold_schedule_and_reward_names():
    never = online.Diagnostics(RewardsConfig(), DiagnosticsConfig(), "unused-dir", start_step=0)
    assert never.gold is None and not never.gold_due(1) and never.gold_scores([], []) is None
    every2 = online.Diagnostics(RewardsConfig(gold="format", gold_every=2), DiagnosticsConfig(),
                                "unused-dir", start_step=0)
    assert [every2.gold_due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    m = every2.rollout_metrics(2, ["p", "p"], ["Answer: 4", "no"])
    assert m == {"completions/distinct_2": 1.0, "gold/mean": pytest.approx(
        sum(every2.gold_scores(["p", "p"], ["Answer: 4", "no"])) / 2)}
    assert "gold/mean" not in every2.rollout_metrics(3, ["p"], ["x y"])
    at_eval = online.Diagnostics(RewardsConfig(gold="format", gold_every=0),
                                 DiagnosticsConfig(), "unused-dir", start_step=0)
    assert not any(at_eval.gold_due(s) for s in range(1, 5))
    with pytest.raises(ConfigError, match="rewards.gold_every must be >= 0"):
        online.Diagnostics(RewardsConfig(gold_every=-1), DiagnosticsConfig(), "x", start_step=0)
    from tether.rewards import RewardError

    with pytest.raises(RewardError, match="unknown reward function 'formt'.*'format'"):
        online.Diagnostics(RewardsConfig(gold="formt"), DiagnosticsConfig(), "x", start_step=0)


def test_config_sections_and_unknown_keys():
    for cls in (PPOConfig, GRPOConfig, DPOConfig):
        cfg = load_config(cls, None, ["--rewards.gold=sentiment", "--rewards.gold_every=3",
                                      "--diagnostics.kl_max=8", "--diagnostics.window=6"])
        assert (cfg.rewards.gold, cfg.rewards.gold_every) == ("sentiment", 3)
        assert (cfg.diagnostics.kl_max, cfg.diagnostics.window) == (8.0, 6)
        with pytest.raises(ConfigError, match=r"'diagnostics\.windw'.*'diagnostics\.window'"):
            load_config(cls, None, ["--diagnostics.windw=3"])
        with pytest.raises(ConfigError, match=r"'rewards\.gold_evry'.*'rewards\.gold_every'"):
            load_config(cls, None, ["--rewards.gold_evry=3"])
    assert DPOConfig().rewards.gold_every == 0 and PPOConfig().rewards.gold_every == 1


def test_rlhf_passes_rewards_and_diagnostics_to_ppo(tmp_path, monkeypatch):
    """Built-in data: PPO gets VADER as `rewards.gold` (unless one is given); the diagnostics
    section reaches the PPO stage as it was set. The built preference set is stood in for by
    the shipped pairs (building it samples the default model for minutes)."""
    from tether.data.preference import builtin_sentiment_rows
    from tether.recipes import rlhf

    pairs = tmp_path / "train.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in builtin_sentiment_rows()))
    monkeypatch.setattr(rlhf, "build_prefs", lambda *a, **k: (pairs, pairs))

    cfg = load_config(RLHFConfig, None, [f"--pipeline.output_dir={tmp_path}",
                                         "--ppo.diagnostics.kl_max=3"])
    ppo_cfg = rlhf.stage_configs(cfg, rlhf.stage_dirs(cfg))["ppo"]
    assert ppo_cfg.rewards.gold == "sentiment" and ppo_cfg.diagnostics.kl_max == 3.0
    cfg = load_config(RLHFConfig, None, [f"--pipeline.output_dir={tmp_path}",
                                         "--ppo.rewards.gold=format", "--rm.data.path=x.jsonl"])
    assert rlhf.stage_configs(cfg, rlhf.stage_dirs(cfg))["ppo"].rewards.gold == "format"


def test_metrics_logger_writes_warning_lists_as_json(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=1, tensorboard=True, progress=False)
    logger.log(1, {"kl/k1": 1.0, "warnings": ["kl_bound"], "warning_messages": ["kl/k1 ..."]})
    logger.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line == {"step": 1, "kl/k1": 1.0, "warnings": ["kl_bound"],
                    "warning_messages": ["kl/k1 ..."]}


def test_sequence_kl_and_rollout_kl_hand_values():
    """logps [[-1, -2, x], [-0.5, x, x]], ref [[-1.5, -1, x], [-0.5, x, x]] (x: masked out).
    lr = logp - ref: row 0 [0.5, -1], row 1 [0].
      k1 (sum lr per row): -0.5 and 0 -> mean -0.25
      k3 = exp(-lr) - 1 + lr: 0.5 -> e^-0.5 - 0.5 = 0.106531; -1 -> e - 2 = 0.718282;
         rows 0.824812 and 0 -> mean 0.412406
    rollout_kl: the same reference split over two trimmed micro-batches gives the same."""
    from types import SimpleNamespace

    import torch

    logps = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, 9.0, 9.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert online.sequence_kl(logps, ref, mask, "k1") == pytest.approx(-0.25)
    assert online.sequence_kl(logps, ref, mask, "k3") == pytest.approx(0.412406, abs=1e-6)
    rollout = SimpleNamespace(logps=torch.where(mask, logps, torch.zeros(())),
                              completion_mask=mask)
    batches = [SimpleNamespace(ref_logps=ref[:1, :2]), SimpleNamespace(ref_logps=ref[1:, :1])]
    assert online.rollout_kl(rollout, batches) == {
        "kl/k1": pytest.approx(-0.25), "kl/k3": pytest.approx(0.412406, abs=1e-6)}


def test_item_prompts_decode_the_prompt_tokens(default_tokenizer):
    from tether.data.collate import Example

    tok = default_tokenizer
    ids = tok("Sky colour?", add_special_tokens=False)["input_ids"]
    done = tok(" blue", add_special_tokens=False)["input_ids"]
    item = SimpleItem(Example(ids + done, [False] * len(ids) + [True] * len(done)))
    empty = SimpleItem(Example(done, [True] * len(done)))
    assert online.item_prompts([item, empty, item], tok) == ["Sky colour?"]


class SimpleItem:
    def __init__(self, example):
        self.sequences = (example, example)
