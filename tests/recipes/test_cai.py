"""`tether cai`: the constitution file and its errors, the critique / revision chat turns exactly,
the pure helpers (hand-checked), the resumable sampling log, and both phases end to end on a tiny
model (DPO, and RM -> PPO on the same SL-CAI stages), a second call skipping finished stages."""

import doctest
import json
import shutil

import pytest

import tether.judge.constitution as constitution
from tether.config import CAIConfig, load_config
from tether.errors import ConfigError, DataError
from tether.judge.constitution import (Principle, clean_revision, critique_turns, degenerate,
                                       load_constitution, pick_principles, revision_turns)
from tether.recipes import cai

P = Principle(name="kind", critique="Identify how your answer is unkind.",
              revision="Rewrite it kindly. Write only the new response.",
              compare="Which response is kinder?")


def test_constitution_doctests():
    assert doctest.testmod(constitution).failed == 0


def test_builtin_constitution():
    principles = load_constitution()
    assert 4 <= len(principles) <= 6
    assert len({p.name for p in principles}) == len(principles)
    for p in principles:
        assert p.compare.startswith("Which response") and p.compare.endswith("?")


@pytest.mark.parametrize("text, message", [
    ("- name: a\n  critique: c\n  revision: r\n  compare: x?\n- name: b\n  critique: c\n"
     "  revision: r\n", "row 2, field 'compare': must be a non-empty string, got None"),
    ("- name: a\n  critique: ''\n  revision: r\n  compare: x?\n",
     "row 1, field 'critique': must be a non-empty string"),
    ("- name: a\n  critique: c\n  revision: r\n  compare: x?\n  tone: warm\n",
     "row 1, field 'tone': unknown key(s) ['tone']"),
    ("- name: a\n  critique: c\n  revision: r\n  compare: x?\n- name: a\n  critique: c\n"
     "  revision: r\n  compare: y?\n", "row 2, field 'name': the name 'a' is used twice"),
    ("- just a string\n", "row 1: must be a mapping"),
    ("name: a\ncritique: c\n", "a constitution is a non-empty YAML list"),
    ("- name: [a\n", "not valid YAML at line"),
])
def test_constitution_errors_name_file_entry_field(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        load_constitution(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)
    with pytest.raises(DataError, match="constitution file not found"):
        load_constitution(tmp_path / "missing.yaml")


def test_critique_and_revision_turns_exactly():
    conversation = [{"role": "user", "content": "Write a note about the rain."},
                    {"role": "assistant", "content": "Rain again. Awful."}]
    asked = critique_turns(conversation, P)
    assert asked == [
        {"role": "user", "content": "Write a note about the rain."},
        {"role": "assistant", "content": "Rain again. Awful."},
        {"role": "user", "content": "Identify how your answer is unkind."}]
    assert revision_turns(asked, "It calls the rain awful.", P) == [
        {"role": "user", "content": "Write a note about the rain."},
        {"role": "assistant", "content": "Rain again. Awful."},
        {"role": "user", "content": "Identify how your answer is unkind."},
        {"role": "assistant", "content": "It calls the rain awful."},
        {"role": "user", "content": "Rewrite it kindly. Write only the new response."}]
    assert len(conversation) == 2  # the conversation itself is not changed


def test_critique_batch_builds_the_turns_it_sends():
    """A fake sampler records every conversation: round 1 critiques the answer, round 2 the first
    revision, each with its own principle."""
    seen = []

    def sample(conversations, params, generator):
        seen.append(conversations)
        return [f"out{len(seen)}-{i}" for i in range(len(conversations))]

    other = Principle("calm", "Is it calm?", "Make it calm.", "Which is calmer?")
    out = cai.critique_batch(sample, [{"prompt": "Q?"}], [P, other], [[0, 1]],
                             params=None, seed=0, batch=0)
    assert seen[0] == [[{"role": "user", "content": "Q?"}]]
    assert seen[4][0] == [
        {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "out1-0"},
        {"role": "user", "content": P.critique}, {"role": "assistant", "content": "out2-0"},
        {"role": "user", "content": P.revision}, {"role": "assistant", "content": "out3-0"},
        {"role": "user", "content": other.critique}, {"role": "assistant", "content": "out4-0"},
        {"role": "user", "content": other.revision}]
    assert out == {"answers": ["out1-0"], "critiques": [["out2-0", "out4-0"]],
                   "revisions": [["out3-0", "out5-0"]], "principles": [["kind", "calm"]]}


def test_clean_revision_and_degenerate():
    assert clean_revision("  Here is the rewritten response:\nWhat a lovely day!\n") \
        == "What a lovely day!"
    assert clean_revision("One line: with a colon inside") == "One line: with a colon inside"
    assert clean_revision("'quoted'") == "quoted"
    assert degenerate("two words") == "too short" and degenerate("two words", min_words=2) is None
    assert degenerate("the the the the the the the the the a b") == "repetitive"  # 3 of 11 distinct


def test_sft_rows_keep_last_revision_and_count_drops():
    prompts = [{"prompt": [{"role": "user", "content": f"q{i}"}], "group": "note"}
               for i in range(3)]
    records = [{"answers": ["a0", "a1"], "revisions": [["r0 is a fine note"], [""]]},
               {"answers": ["a2"], "revisions": [["first try here", "ok"]]}]
    rows, dropped = cai.sft_rows(prompts, records, min_words=3)
    assert rows == [{"prompt": [{"role": "user", "content": "q0"}],
                     "completion": [{"role": "assistant", "content": "r0 is a fine note"}],
                     "group": "note"}]
    assert dropped == {"empty": 1, "too short": 1}


def test_gold_agreement_by_hand():
    """Gaps 0.5 (agree), -0.3 (disagree), 0.05 (a tie at min_gap 0.1, not counted), 0.2
    (agree): 2 of 3 decided pairs agree."""
    rows = [{"gold_chosen": c, "gold_rejected": r}
            for c, r in ((0.5, 0.0), (0.1, 0.4), (0.3, 0.25), (0.2, 0.0))]
    agreement, decided = cai.gold_agreement(rows)
    assert decided == 3 and agreement == pytest.approx(2 / 3)
    assert cai.gold_agreement(rows[2:3]) == (None, 0)


def test_split_prompts_and_principle_picks_are_seeded_and_disjoint():
    rows = [{"prompt": f"p{i}"} for i in range(10)]
    sl, rl = cai.split_prompts(rows, 4, 5, seed=0)
    assert len(sl) == 4 and len(rl) == 5
    assert not {r["prompt"] for r in sl} & {r["prompt"] for r in rl}
    assert cai.split_prompts(rows, 4, 5, seed=0) == (sl, rl)
    with pytest.raises(ConfigError, match="cai.sl_prompts"):
        cai.split_prompts(rows, 6, 5, seed=0)
    assert pick_principles(20, 5, seed=1, stage="sl") == pick_principles(20, 5, seed=1, stage="sl")
    assert pick_principles(20, 5, seed=1, stage="sl") != pick_principles(20, 5, seed=1, stage="rl")


def test_logged_batches_resume_after_a_torn_line(tmp_path):
    from tether.engine.batchlog import logged_batches, settings_guard

    path = tmp_path / "log.jsonl"
    path.write_text('{"batch": 0, "x": 0}\n{"batch": 2, "x": 2}\n{"batch": 1, "x"')  # killed
    made, shown = [], []

    def make(b):
        made.append(b)
        return {"x": b}

    records = logged_batches(path, 4, make, progress=shown.append)
    assert made == [1, 3] and [r["x"] for r in records] == [0, 1, 2, 3]
    assert shown == [2, 3, 4]
    assert [json.loads(x)["batch"] for x in path.read_text().splitlines()] == [0, 2, 1, 3]
    settings_guard(path, {"seed": 0})
    settings_guard(path, {"seed": 0})  # the same settings resume
    with pytest.raises(ConfigError, match="was sampled with other settings"):
        settings_guard(path, {"seed": 1})


def tiny_overrides(model_dir, out_dir, *extra):
    quiet = ["run.progress=false", "run.tensorboard=false", "train.precision=fp32",
             "data.max_length=96", "run.report=false"]
    stages = {
        "sft": ["train.max_steps=2", "train.batch_size=2", "train.micro_batch_size=2",
                "train.lr=1e-3", "run.eval_generations=0"],
        "dpo": ["train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=4",
                "train.lr=1e-3"],
        "rm": ["train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=4"],
        "ppo": ["train.max_steps=1", "train.batch_size=2", "train.micro_batch_size=2",
                "ppo.max_new_tokens=4", "ppo.update_epochs=1", "run.eval_generations=0"],
    }
    return [f"--cai.output_dir={out_dir}", f"--cai.model={model_dir}", f"--judge.model={model_dir}",
            "--cai.sl_prompts=6", "--cai.rl_prompts=12", "--cai.batch_prompts=4",
            "--cai.max_new_tokens=6", "--cai.min_words=1", "--cai.progress=false",
            "--cai.precision=fp32", "--eval.num_prompts=2", "--eval.samples_per_prompt=1",
            "--eval.max_new_tokens=4", "--eval.tax=false", "--eval.batch_size=2",
            *[f"--{stage}.{item}" for stage, items in stages.items()
              for item in items + quiet], *extra]


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cai") / "run"
    args = tiny_overrides(tiny_model_dir, out_dir)
    return out_dir, args, cai.run(load_config(CAIConfig, None, args))


def test_cai_end_to_end_dpo(dpo_run):
    out_dir, _, out = dpo_run
    stages = out["stages"]
    assert list(stages) == ["critique", "sft", "label", "dpo", "eval"]
    assert not any(s["skipped"] for s in stages.values())
    rows = [json.loads(x)
            for x in (out_dir / "critique" / "sft_rows.jsonl").read_text().splitlines()]
    assert len(rows) == stages["critique"]["kept"] and rows
    assert rows[0]["completion"][0]["role"] == "assistant"
    assert rows[0]["prompt"][0]["role"] == "user"
    assert len((out_dir / "critique" / "revisions.jsonl").read_text().splitlines()) == 2  # 6 / 4
    pairs = [json.loads(x) for x in (out_dir / "label" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and len(pairs) == stages["label"]["kept"]
    assert all(0.5 <= p["p"] <= 1 and p["principle"] for p in pairs)
    assert (out_dir / "sft" / "model" / "config.json").is_file()
    assert (out_dir / "dpo" / "policy" / "config.json").is_file()
    dpo_cfg = (out_dir / "dpo" / "config.yaml").read_text()
    assert str(out_dir / "sft" / "model") in dpo_cfg and "soft_label_key: p" in dpo_cfg
    report = json.loads((out_dir / "eval" / "eval.json").read_text())
    assert report["model_path"] == str(out_dir / "dpo" / "policy")
    assert stages["eval"]["gold/mean"][1] == report["results"]["policy"]["metrics"]["gold/mean"]
    assert json.loads((out_dir / "summary.json").read_text())["label"]["judged"] \
        == stages["label"]["judged"]


def test_cai_second_call_skips_finished_stages(dpo_run, capsys):
    out_dir, args, first = dpo_run
    from tether.cli import main

    assert main(["cai", *args]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 5 and "tether eval" in printed
    summary = json.loads((out_dir / "summary.json").read_text())
    assert all(s["skipped"] for s in summary.values())
    assert summary["dpo"]["loss/dpo"] == first["stages"]["dpo"]["loss/dpo"]


def test_cai_rm_ppo_on_the_same_sl_cai_stages(dpo_run, tmp_path):
    out_dir, args, _ = dpo_run
    new = tmp_path / "rm_ppo"
    for stage in ("critique", "sft", "label"):
        shutil.copytree(out_dir / stage, new / stage)
    out = cai.run(load_config(CAIConfig, None, [*args, f"--cai.output_dir={new}",
                                                "--cai.rl=rm_ppo"]))
    assert [n for n, s in out["stages"].items() if not s["skipped"]] == ["rm", "ppo", "eval"]
    assert (new / "rm" / "reward_model" / "config.json").is_file()
    assert json.loads((new / "eval" / "eval.json").read_text())["model_path"] \
        == str(new / "ppo" / "policy")


def test_cai_bad_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cai.rl must be one of dpo, rm_ppo"):
        cai.stage_names(load_config(CAIConfig, None, ["--cai.rl=ppo"]))
    with pytest.raises(ConfigError, match="unknown config key 'cai.rl_prompt'"):
        load_config(CAIConfig, None, ["--cai.rl_prompt=3"])
