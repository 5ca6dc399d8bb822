"""A run that fails, is interrupted or is killed (docs/cli.md, "Failure and resume"), on the tiny
SFT run through the `tether` command:

- a NaN loss: exit 3, one line naming the step and the micro-batch, no checkpoint for that step;
- Ctrl-C (SIGINT) mid-step: the step finishes, is checkpointed, exit 130 with a line naming the
  checkpoint; `--run.resume=true` continues and its metrics equal an uninterrupted run's;
- kill -9 of a real `python -m tether sft` process after its 2nd checkpoint, and inside the save
  of its 3rd: the resume uses the last complete checkpoint (and, when that one is damaged, the
  one before, named on stderr) and its metrics equal an uninterrupted run's, to the bit on CPU.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_sft_overrides
from tether.cli import main
from tether.engine import checkpoint
from tether.recipes import sft

ROOT = Path(__file__).resolve().parents[2]
TIMING = ("timing/update", "tokens/per_second", "memory/peak_mb")  # differ between runs by nature


def _args(model_dir, run_dir, *extra):
    """`tether sft` for 4 steps of 2 micro-batches of 1 on the tiny model, 4 held-out rows."""
    return ["sft", *tiny_sft_overrides(model_dir, run_dir, "--train.max_steps=4",
                                       "--train.batch_size=2", "--train.micro_batch_size=1",
                                       "--data.eval_fraction=0.02", "--run.eval_generations=0",
                                       "--run.report=false", *extra)]


def _records(run_dir):
    """metrics.jsonl: {step: record} of the training steps (timing dropped), and the last line
    (the final evaluation)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: {k: v for k, v in r.items() if k not in TIMING}
             for r in rows if "loss/sft" in r}
    return steps, rows[-1]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(_args(tiny_model_dir, run)) == 0
    steps, last = _records(run)
    assert sorted(steps) == [1, 2, 3, 4]
    return steps, last


def _assert_same_run(run_dir, uninterrupted):
    steps, last = _records(run_dir)
    assert sorted(steps) == sorted(uninterrupted[0])
    for step, record in uninterrupted[0].items():
        assert steps[step] == record, (step, steps[step], record)  # exact: fp32 on CPU
    assert last == uninterrupted[1]


def _train_calls(monkeypatch, hook):
    """Wrap the SFT loss so that `hook(call, loss)` sees each training micro-batch (0-based
    across steps; evaluation forwards are not counted) and may replace its loss."""
    real, calls = sft.sft_loss, [0]

    def loss_fn(policy, batch):
        loss, metrics = real(policy, batch)
        if policy.training:
            loss = hook(calls[0], loss)
            calls[0] += 1
        return loss, metrics

    monkeypatch.setattr(sft, "sft_loss", loss_fn)


def test_nan_loss_names_step_and_micro_batch_and_writes_no_checkpoint(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    # 2 micro-batches per step: call 3 is step 2's second micro-batch
    _train_calls(monkeypatch, lambda call, loss: loss * float("nan") if call == 3 else loss)
    run = tmp_path / "run"
    assert main(_args(tiny_model_dir, run, "--run.save_every=1", "--run.keep_last=0")) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("tether: error: step 2: the loss of micro-batch 1 (of 2) is nan: the run "
                       "stops here and writes no checkpoint for this step")
    assert "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000001"]


def test_sigint_saves_the_step_exits_130_and_resumes_exactly(
        tiny_model_dir, tmp_path, monkeypatch, capsys, uninterrupted):
    def interrupt(call, loss):
        if call == 2:  # step 2, first micro-batch: Ctrl-C arrives mid-step
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    _train_calls(monkeypatch, interrupt)
    before = signal.getsignal(signal.SIGINT)
    run = tmp_path / "run"
    assert main(_args(tiny_model_dir, run)) == 130  # save_every 0: only this checkpoint
    assert signal.getsignal(signal.SIGINT) is before  # the handler is the caller's again
    err = capsys.readouterr().err
    assert "tether: interrupt: finishing step 2, then saving a checkpoint" in err
    assert err.strip().splitlines()[-1] == (
        f"tether: interrupted after step 2 of 4: checkpoint {run}/checkpoints/step-000002 saved; "
        "continue with --run.resume=true")
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000002"]
    monkeypatch.undo()
    torch.manual_seed(1234)  # the resumed run owes nothing to the caller's RNG
    assert main(_args(tiny_model_dir, run, "--run.resume=true")) == 0
    _assert_same_run(run, uninterrupted)


SLOW_SAVES = textwrap.dedent("""
    # `python -m tether` whose checkpoint saves leave time to be killed: after the save of
    # step 2 ("after"), or inside the save of step 3, with its model file written ("inside")
    import os, sys, time
    from tether.cli import entry
    from tether.engine import checkpoint
    real_save, real_save_file = checkpoint.save, checkpoint.save_file
    def save(*args, **kwargs):
        path = real_save(*args, **kwargs)
        time.sleep(30 if MODE == "after" and args[1] == 2 else 0)
        return path
    def save_file(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        if MODE == "inside" and ".tmp-step-000003" in str(path):
            open(os.path.join(os.path.dirname(os.path.dirname(str(path))), "SAVING"), "w").close()
            time.sleep(30)
    checkpoint.save, checkpoint.save_file = save, save_file
    sys.argv[0] = "tether"
    entry()
""")


def _kill_when(proc, ready, limit=120.0):
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t0 < limit, "the run never got there"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("mode", ["after", "inside"])
def test_kill_9_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path, capsys, mode,
                                                 uninterrupted):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    args = _args(tiny_model_dir, run, "--run.save_every=1", "--run.keep_last=3")
    proc = subprocess.Popen(
        [sys.executable, "-c", f"MODE = {mode!r}\n{SLOW_SAVES}", *args], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if mode == "after":  # killed right after its 2nd checkpoint
            _kill_when(proc, lambda: (ckpts / "latest").is_file()
                       and (ckpts / "latest").read_text() == "step-000002")
        else:  # killed while writing its 3rd
            _kill_when(proc, lambda: (ckpts / "SAVING").is_file())
            assert (ckpts / ".tmp-step-000003").is_dir() and not (ckpts / "step-000003").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert checkpoint.latest(ckpts).name == "step-000002"
    with open(run / "metrics.jsonl", "a") as f:  # a line the kill cut short
        f.write('{"step": 3, "loss/s')
    if mode == "after":  # and the newest checkpoint damaged since: the one before is used
        model_file = ckpts / "step-000002" / "model.safetensors"
        model_file.write_bytes(model_file.read_bytes()[:-10])
    capsys.readouterr()
    assert main(_args(tiny_model_dir, run, "--run.save_every=1", "--run.resume=true")) == 0
    err = capsys.readouterr().err
    if mode == "after":
        assert (f"tether: checkpoint {ckpts}/step-000002 is unusable (model.safetensors is "
                in err and "using step-000001" in err), err
    _assert_same_run(run, uninterrupted)
    assert not list(ckpts.glob(".tmp-*"))  # the killed save's debris was swept
