"""The run ritual's guards (tether.engine.run; docs/cli.md, "Run directories"), through the
`tether` command on a seconds-long SFT run: one run per directory (a live holder is named by its
pid, a dead one's lock is taken), an earlier run is refused unless resumed or overwritten (and
overwrite deletes only run files), a resume with other maths or other data is refused unless
allowed, and checkpoints come by the clock."""

import json
import signal
import subprocess
import sys
import textwrap

from tests.conftest import tiny_sft_overrides
from tether.cli import main
from tether.data.tasks import builtin_sft_rows
from tether.engine.run import HOW_TO_START, SAME_MATHS, config_changes


def _sft(model, run, *extra):
    return main(["sft", *tiny_sft_overrides(model, run, "--train.max_steps=2",
                                            "--train.batch_size=2", "--train.micro_batch_size=2",
                                            "--run.eval_generations=0", "--run.report=false",
                                            *extra)])


def _error(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("tether: error")]
    assert len(lines) == 1, lines
    return lines[0]


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tether.engine.locks import lock_with_pid
    Path(sys.argv[1]).mkdir(parents=True)
    held = lock_with_pid(Path(sys.argv[1]) / ".tether.lock", "")
    print("held", flush=True)
    time.sleep(120)
""")


def test_a_live_holder_is_named_by_pid_and_a_dead_ones_lock_is_taken(tiny_model_dir, tmp_path,
                                                                       capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _sft(tiny_model_dir, run) == 2
        assert _error(capsys) == (f"tether: error: {run} is in use by another tether run (pid "
                                  f"{holder.pid}); wait for it to finish or give another "
                                  "--run.output_dir")
        assert not (run / "config.yaml").exists()  # nothing written beside the holder's run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _sft(tiny_model_dir, run) == 0  # its holder is dead: the stale lock is taken


def test_an_earlier_run_is_refused_and_overwrite_deletes_only_run_files(tiny_model_dir,
                                                                        tmp_path, capsys):
    run = tmp_path / "run"
    assert _sft(tiny_model_dir, run, "--train.max_steps=3") == 0
    (run / "notes.txt").write_text("mine")
    assert _sft(tiny_model_dir, run) == 2
    assert "holds an earlier run (config.yaml, metrics.jsonl, checkpoints)" in _error(capsys)
    assert _sft(tiny_model_dir, run, "--run.overwrite=true") == 0
    assert (run / "notes.txt").read_text() == "mine"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "loss/sft" in x]
    assert steps == [1, 2]  # the 3-step run's lines and checkpoints are gone
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000002"]


def test_a_resume_with_other_maths_or_data_is_refused_unless_allowed(tiny_model_dir, tmp_path,
                                                                     capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in builtin_sft_rows()[:40]))
    run, with_data = tmp_path / "run", f"--data.path={data}"
    assert _sft(tiny_model_dir, run, with_data) == 0
    capsys.readouterr()
    resume = ("--run.resume=true", "--train.max_steps=3")  # train longer: allowed
    assert _sft(tiny_model_dir, run, with_data, *resume, "--train.lr=1e-3") == 2
    error = _error(capsys)
    assert "run.resume: " in error and "was trained with other settings (train.lr 0.02 -> 0.001)" \
        in error and error.endswith("--run.allow_config_change=true"), error
    data.write_text(data.read_text().replace("1", "2"))
    assert _sft(tiny_model_dir, run, with_data, *resume) == 2
    assert "other settings (data {data.path sha256 " in _error(capsys)
    assert _sft(tiny_model_dir, run, with_data, *resume, "--run.allow_config_change=true",
                "--run.save_every=1") == 0
    out = capsys.readouterr().out
    assert "resume: changed settings (run.save_every 0 -> 1, " in out
    assert "data {data.path sha256 " in out
    assert "train.max_steps 2 -> 3" in out and "continues with the new ones" in out


def test_checkpoints_by_the_clock_and_the_first_line_says_so(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert _sft(tiny_model_dir, run, "--train.max_steps=3", "--run.save_every_minutes=1e-9",
                "--run.keep_last=0") == 0
    assert f"checkpoints: {run}/checkpoints, every 1e-09 minutes, at the end and on Ctrl-C; " \
        "keeping all" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [
        "step-000001", "step-000002", "step-000003"]


def test_config_changes_flatten_sections_but_not_mappings():
    old = {"train": {"lr": 1e-3, "seed": 0}, "grpo": {"beta": 0.0, "group_rewards": {"a": ["x"]}}}
    new = {"train": {"lr": 1e-2, "seed": 0}, "grpo": {"beta": 0.0, "group_rewards": {"a": ["y"]}}}
    assert config_changes(old, new) == {"train.lr": (1e-3, 1e-2),
                                        "grpo.group_rewards": ({"a": ["x"]}, {"a": ["y"]})}
    assert "train.lr" not in SAME_MATHS and "run.progress" in SAME_MATHS
    assert "run.resume" in HOW_TO_START  # how a run starts is never a change
