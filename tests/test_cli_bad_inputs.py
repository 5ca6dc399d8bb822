"""Bad command lines, one table: what a new user types wrong (commands, config keys and values,
config files, model directories, output and checkpoint directories) and the one line `tether`
must answer with, naming the key, file or checkpoint, exit status 2 and no traceback.

Data files and rows have their own table (tests/data/test_bad_inputs.py); this one goes through
`tether.cli.main` in-process, as the `tether` command does, so each case costs at most a tiny
model's load. Two cases run the real `python -m tether` in a subprocess.

Each case: (name, argv, message). In argv, {model} is a tiny model directory, {tmp} the test's
own directory, {run} a fresh run directory; BASE (a seconds-long SFT run) is appended to recipe
commands. `setup` (SETUPS[name]) prepares files first. The message is a regular expression
searched in the last line of stderr.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tether.cli import main

BASE = ["--train.max_steps=1", "--train.batch_size=2", "--train.micro_batch_size=2",
        "--train.precision=fp32", "--data.max_length=64", "--run.progress=false",
        "--run.tensorboard=false", "--run.eval_generations=0", "--run.report=false"]
RECIPE = ["--model.name_or_path={model}", "--run.output_dir={run}", *BASE]

CASES = [  # (name, argv, message)
    # --- command line ---------------------------------------------------------------------------
    ("unknown_command", ["sfx"], r"unknown command 'sfx'; did you mean 'sft'\?"),
    ("keys_without_recipe", ["keys"], r"usage: tether keys RECIPE \(one of sft, dpo"),
    ("keys_unknown_recipe", ["keys", "sfft"], r"usage: tether keys RECIPE"),
    ("two_config_files", ["sft", "a.yaml", "b.yaml"],
     r"unexpected argument 'b.yaml' \(only one CONFIG.yaml is taken\)"),
    ("export_one_argument", ["export", "{tmp}"], r"usage: tether export RUN_DIR OUT_DIR"),
    ("export_not_a_run", ["export", "{tmp}/nope", "{tmp}/out"],
     r"{tmp}/nope is not a tether run directory \(no config.yaml\)"),
    ("export_run_without_checkpoint", ["export", "{tmp}/run0", "{tmp}/out"],
     r"{tmp}/run0/checkpoints holds no complete checkpoint to export"),
    ("export_into_a_folder_with_files", ["export", "{run}", "{tmp}/mine"],
     r"{tmp}/mine exists and is not empty; choose a new folder, or pass --force"),
    ("export_into_the_current_folder", ["export", "{run}", "."],
     r"{tmp} exists and is not empty; choose a new folder, or pass --force"),
    ("export_onto_the_run", ["export", "{run}", "{run}", "--force"],
     r"{run} is inside the run directory {run}; export to a folder outside the run"),
    ("export_inside_the_run", ["export", "{run}", "{run}/checkpoints/out", "--force"],
     r"{run}/checkpoints/out is inside the run directory {run}"),
    ("export_unknown_option", ["export", "{run}", "{tmp}/out", "--forse"],
     r"unknown option '--forse'; usage: tether export RUN_DIR OUT_DIR \[--force\]"),
    ("report_unknown_option", ["report", "{tmp}", "--bogus"], r"unknown option '--bogus'"),
    ("report_over_the_metrics", ["report", "{run}", "--out", "{run}/metrics.jsonl"],
     r"--out {run}/metrics.jsonl is a file of the run that tether report did not write"),
    ("report_over_a_user_file", ["report", "{run}", "--out={tmp}/notes.html"],
     r"--out {tmp}/notes.html is an existing file that tether report did not write"),
    ("report_no_run_dir", ["report", "{tmp}/nope"], r"run directory '{tmp}/nope' does not exist"),
    ("override_without_value_last", ["sft", "--train.lr"],
     r"override '--train.lr' must look like --section.key=value"),
    # --- config values out of range or of the wrong kind ----------------------------------------
    ("batch_size_zero", ["sft", "--train.batch_size=0"],
     r"config key 'train.batch_size' must be > 0, got 0"),
    ("micro_batch_size_negative", ["sft", "--train.micro_batch_size=-2"],
     r"config key 'train.micro_batch_size' must be > 0, got -2"),
    ("lr_negative", ["dpo", "--train.lr=-1e-5"], r"config key 'train.lr' must be > 0, got -1e-05"),
    ("lr_nan", ["sft", "--train.lr=nan"], r"config key 'train.lr' must be a number, got nan"),
    ("log_every_zero", ["sft", "--run.log_every=0"], r"'run.log_every' must be > 0, got 0"),
    ("chunk_size_zero", ["sft", "--train.logprob_chunk_size=0"],
     r"'train.logprob_chunk_size' must be > 0"),
    ("eval_fraction_above_one", ["sft", "--data.eval_fraction=1.5"],
     r"'data.eval_fraction' must be in \[0, 1\), got 1.5"),
    ("warmup_ratio_two", ["sft", "--train.warmup_ratio=2"],
     r"'train.warmup_ratio' must be in \[0, 1\], got 2.0"),
    ("save_every_negative", ["sft", "--run.save_every=-1"], r"'run.save_every' must be >= 0"),
    ("epochs_zero", ["sft", "--train.epochs=0"], r"'train.epochs' must be > 0, got 0.0"),
    ("max_length_zero", ["sft", "--data.max_length=0"], r"'data.max_length' must be > 0"),
    ("lora_rank_negative", ["sft", "--model.lora.r=-4"], r"'model.lora.r' must be >= 0, got -4"),
    ("grad_norm_negative", ["sft", "--train.max_grad_norm=-1"],
     r"'train.max_grad_norm' must be >= 0"),
    ("dpo_beta_negative", ["dpo", "--dpo.beta=-0.1"], r"'dpo.beta' must be > 0, got -0.1"),
    ("output_dir_empty", ["sft", *RECIPE, "--run.output_dir="],
     r"config key 'run.output_dir' is empty: name a folder"),
    ("rlhf_output_dir_empty", ["rlhf", "--pipeline.output_dir=''"],
     r"config key 'pipeline.output_dir' must be a folder \(empty would write into the current"),
    ("reward_module_syntax_error", ["grpo", *RECIPE, "--grpo.rewards=broken_rewards:f"],
     r"reward function 'broken_rewards:f': importing module 'broken_rewards' raised SyntaxError: "
     r".*broken_rewards.py, line 1\)"),
    ("reward_module_raises_on_import", ["grpo", *RECIPE, "--grpo.rewards=angry_rewards:f"],
     r"reward function 'angry_rewards:f': importing module 'angry_rewards' raised RuntimeError: "
     r"no config here"),
    ("gguf_garbage", ["sft", *RECIPE, "--model.name_or_path={tmp}/random.gguf"],
     r"model.name_or_path: {tmp}/random.gguf is not a GGUF file"),
    ("epochs_infinite", ["sft", "--train.max_steps=-1", "--train.epochs=inf"],
     r"config key 'train.epochs' must be a finite number, got inf"),
    ("lr_infinite", ["sft", "--train.lr=inf"], r"'train.lr' must be a finite number, got inf"),
    ("max_steps_below_minus_one", ["sft", "--train.max_steps=-2"],
     r"'train.max_steps' must be >= -1 \(-1: train.epochs decides\), got -2"),
    ("grpo_prompts_per_step_zero", ["grpo", "--grpo.prompts_per_step=0"],
     r"'grpo.prompts_per_step' must be > 0, got 0"),
    ("grpo_max_new_tokens_zero", ["grpo", "--grpo.max_new_tokens=0"],
     r"'grpo.max_new_tokens' must be > 0, got 0"),
    ("grpo_group_of_one", ["grpo", "--grpo.group_size=1"],
     r"'grpo.group_size' must be >= 2 \(advantages compare the samples of a group\), got 1"),
    ("ppo_top_p_zero", ["ppo", "--ppo.top_p=0"], r"'ppo.top_p' must be in \(0, 1\], got 0.0"),
    ("ppo_gamma_above_one", ["ppo", "--ppo.gamma=1.5"], r"'ppo.gamma' must be in \[0, 1\]"),
    ("rlhf_ppo_clip_negative", ["rlhf", "--ppo.ppo.clip_eps=-0.2"],
     r"'ppo.ppo.clip_eps' must be > 0, got -0.2"),
    ("resume_a_path", ["sft", "--run.resume={tmp}/run0"],
     r"config key 'run.resume' must be true or false, got '{tmp}/run0'"),
    ("section_given_a_value", ["sft", "--train=3"],
     r"config key 'train' is a section; give it a mapping"),
    ("yaml_lr_nan", ["sft", "{tmp}/nan.yaml"], r"config key 'train.lr' must be a number, got nan"),
    ("yaml_section_a_list", ["sft", "{tmp}/list.yaml"],
     r"config key 'train' is a section; give it a mapping"),
    ("config_a_directory", ["sft", "{tmp}"], r"{tmp}: is a directory; give a CONFIG.yaml file"),
    ("batch_not_multiple_of_micro", ["sft", *RECIPE, "--train.batch_size=3"],
     r"train.batch_size \(3\) must be a multiple of train.micro_batch_size \(2\) x world size"),
    ("precision_unknown", ["sft", *RECIPE, "--train.precision=fp16"],
     r"train.precision must be one of \('auto', 'bf16', 'fp32'\), got 'fp16'"),
    ("schedule_misspelled", ["sft", *RECIPE, "--train.schedule=cosin"],
     r"train.schedule must be one of \('cosine', 'linear', 'constant'\), got 'cosin'"),
    ("batch_larger_than_data", ["sft", *RECIPE, "--train.batch_size=400"],
     r"train.batch_size \(400\) exceeds the \d+ training examples"),
    # --- files: data, models, output ------------------------------------------------------------
    ("eval_path_missing", ["sft", *RECIPE, "--data.eval_path={tmp}/held_out.jsonl"],
     r"data file not found: {tmp}/held_out.jsonl"),
    ("model_dir_missing", ["sft", *RECIPE, "--model.name_or_path={tmp}/no_model"],
     r"model.name_or_path: {tmp}/no_model is not a model directory \(no config.json\)"),
    ("model_dir_without_safetensors", ["sft", *RECIPE, "--model.name_or_path={tmp}/no_weights"],
     r"{tmp}/no_weights has no \*.safetensors weights; tether loads safetensors only"),
    ("attn_implementation_unknown", ["sft", *RECIPE, "--model.attn_implementation=flash9"],
     r"model.attn_implementation 'flash9': Specified `attn_implementation=\"flash9\"` is not "
     r"supported \(sdpa and eager always work\)"),
    ("gguf_file_missing", ["sft", *RECIPE, "--model.gguf_file=m.gguf"],
     r"model.gguf_file: no GGUF file at {model}/m.gguf"),
    ("lora_target_unknown", ["sft", *RECIPE, "--model.lora.r=4",
                             "--model.lora.target_modules=qq_proj"],
     r"model.lora.target_modules: no module named \['qq_proj'\] in this model"),
    ("output_dir_is_a_file", ["sft", *RECIPE, "--run.output_dir={tmp}/a_file"],
     r"{tmp}/a_file: File exists"),
    # --- checkpoints ----------------------------------------------------------------------------
    ("resume_without_checkpoint", ["sft", *RECIPE, "--run.resume=true"],
     r"run.resume is true but {run}/checkpoints holds no checkpoint"),
    ("resume_only_checkpoint_corrupt", ["sft", *RECIPE, "--run.resume=true"],
     r"run.resume is true but {run}/checkpoints holds no checkpoint"),
    ("resume_only_checkpoint_byte_flipped", ["sft", *RECIPE, "--run.resume=true"],
     r"run.resume is true but {run}/checkpoints holds no checkpoint"),
    # --- run directories (docs/cli.md, "Run directories") ------------------------------------
    ("run_dir_in_use", ["sft", *RECIPE],
     r"{run} is in use by another tether run \(pid 4242\); wait for it to finish or give "
     r"another --run.output_dir"),
    ("run_dir_holds_an_earlier_run", ["sft", *RECIPE],
     r"{run} holds an earlier run \(config.yaml, metrics.jsonl\): continue it with "
     r"--run.resume=true, write to a new --run.output_dir, or delete its run files with "
     r"--run.overwrite=true"),
    ("resume_and_overwrite", ["sft", *RECIPE, "--run.resume=true", "--run.overwrite=true"],
     r"run.resume and run.overwrite are both true"),
    ("save_every_minutes_negative", ["sft", "--run.save_every_minutes=-1"],
     r"'run.save_every_minutes' must be >= 0, got -1.0"),
    ("resume_checkpoint_of_another_model", ["sft", *RECIPE, "--run.resume=true"],
     r"checkpoint {run}/checkpoints/step-000001: checkpoint does not match the model: "
     r"model.model.embed_tokens.weight is \(32, 32\) there, \(\d+, 32\) here \(was it saved "
     r"with another model.name_or_path or model.lora\?\)"),
]


def _foreign_checkpoint(run: Path) -> Path:
    """A complete checkpoint of a model that is not the run's (vocabulary 32, untied)."""
    from tests.engine.test_checkpoint import _setup
    from tether.engine import checkpoint

    model, opt, sched = _setup()
    return checkpoint.save(run / "checkpoints", 1, model=model, optimizer=opt, scheduler=sched,
                           trainer_state={})


def _corrupt_checkpoint(run: Path) -> None:
    path = _foreign_checkpoint(run) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _flipped_checkpoint(run: Path) -> None:
    """Same size, whole header, one bit of the weights changed: only the checksum tells."""
    path = _foreign_checkpoint(run) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


def _finished_run(run: Path) -> None:
    """A run directory as a finished run leaves it (config, metrics, a checkpoint)."""
    _foreign_checkpoint(run)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss/sft": 2.0}\n')


def _user_files(tmp: Path, run: Path) -> None:
    _finished_run(run)
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("keep me")
    (tmp / "notes.html").write_text("<html>my notes</html>")
_HELD = []  # the lock "another run" holds during run_dir_in_use


def _lock_held_by_4242(run: Path) -> None:
    """RUN_DIR's lock held through another open file, as another process holds it."""
    import fcntl

    run.mkdir()
    f = open(run / ".tether.lock", "w")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write("4242\n")
    f.flush()
    _HELD.append(f)


def _earlier_run(run: Path) -> None:
    run.mkdir()
    (run / "config.yaml").write_text("train: {}\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')


def _no_weights(tmp: Path, model: Path) -> None:
    shutil.copytree(model, tmp / "no_weights", ignore=shutil.ignore_patterns("*.safetensors"))


USER_FILE_CASES = ("export_into_a_folder_with_files", "export_into_the_current_folder",
                   "export_onto_the_run", "export_inside_the_run", "export_unknown_option",
                   "report_over_the_metrics", "report_over_a_user_file")
SETUPS = {
    "yaml_lr_nan": lambda tmp, run, model: (tmp / "nan.yaml").write_text("train:\n  lr: .nan\n"),
    "yaml_section_a_list": lambda tmp, run, model: (tmp / "list.yaml").write_text(
        "train:\n  - lr\n"),
    "export_run_without_checkpoint": lambda tmp, run, model: (
        (tmp / "run0").mkdir(), (tmp / "run0" / "config.yaml").write_text("model: {}\n")),
    "model_dir_without_safetensors": lambda tmp, run, model: _no_weights(tmp, model),
    "output_dir_is_a_file": lambda tmp, run, model: (tmp / "a_file").write_text("x"),
    "resume_only_checkpoint_corrupt": lambda tmp, run, model: _corrupt_checkpoint(run),
    "resume_checkpoint_of_another_model": lambda tmp, run, model: _foreign_checkpoint(run),
    "resume_only_checkpoint_byte_flipped": lambda tmp, run, model: _flipped_checkpoint(run),
    # the test runs in tmp (monkeypatch.chdir): a reward module beside the config is found there
    "reward_module_syntax_error": lambda tmp, run, model: (tmp / "broken_rewards.py").write_text(
        "def f(:\n"),
    "reward_module_raises_on_import": lambda tmp, run, model: (
        tmp / "angry_rewards.py").write_text("raise RuntimeError('no config here')\n"),
    "gguf_garbage": lambda tmp, run, model: (tmp / "random.gguf").write_bytes(
        bytes(range(256)) * 8),
    **{name: lambda tmp, run, model: _user_files(tmp, run) for name in USER_FILE_CASES},
    "run_dir_in_use": lambda tmp, run, model: _lock_held_by_4242(run),
    "run_dir_holds_an_earlier_run": lambda tmp, run, model: _earlier_run(run),
}

# what the setups wrote that a refused command must leave byte for byte
KEPT = {"mine/notes.txt": "keep me", "notes.html": "<html>my notes</html>",
        "run/metrics.jsonl": '{"step": 1, "loss/sft": 2.0}\n', "run/config.yaml": "model: {}\n"}


def test_the_table_has_the_cases_the_hardening_issue_asks_for():
    assert len(CASES) >= 25
    assert len({name for name, *_ in CASES}) == len(CASES)
    assert set(SETUPS) <= {name for name, *_ in CASES}


def _fill(text: str, **where) -> str:
    for key, value in where.items():
        text = text.replace("{" + key + "}", str(value))
    return text


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_command_line_is_one_clear_line(tmp_path, tiny_model_dir, capsys, monkeypatch, name,
                                            argv, message):
    monkeypatch.chdir(tmp_path)  # a stray relative path lands here, never in the repository
    run = tmp_path / "run"
    where = {"tmp": tmp_path, "run": run, "model": tiny_model_dir}
    if name in SETUPS:
        SETUPS[name](tmp_path, run, tiny_model_dir)
    status = main([_fill(a, **where) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("tether:")]
    assert status == 2, (status, err[-2000:])
    assert "Traceback" not in out + err
    assert lines and lines[-1].startswith("tether: error: "), err[-2000:]
    assert len([line for line in lines if line.startswith("tether: error")]) == 1
    pattern = _fill(message, **{k: re.escape(str(v)) for k, v in where.items()})
    assert re.search(pattern, lines[-1]), lines[-1]
    if name in USER_FILE_CASES:
        for rel, text in KEPT.items():  # refused: nothing of the user's or the run's changed
            assert (tmp_path / rel).read_text() == text, rel
        assert (run / "checkpoints" / "step-000001" / "model.safetensors").is_file()
    if name == "resume_only_checkpoint_corrupt":  # the line before names the bad checkpoint
        assert re.search(r"tether: checkpoint .*step-000001 is unusable \(model.safetensors is "
                         r"100 bytes but \d+ were written\)", lines[0]), lines


@pytest.mark.parametrize("argv, message", [
    (["sft", "--train.batch_size=eight"],
     "config key 'train.batch_size' must be an integer, got 'eight'"),
    (["report"], "usage: tether report RUN_DIR [--out FILE]"),
], ids=["wrong_type", "report_without_run"])
def test_the_installed_command_prints_one_line_and_exits_2(argv, message):
    """The real process: `python -m tether` (what the `tether` script runs)."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "tether", *argv], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"tether: error: {message}"], proc.stderr

