"""2 CPU processes under torchrun with FSDP2 give the DPO (and KTO) loss curve of 1 process.

KTO is the case to watch: its reference point z is a mean over the whole step's mismatched
sequences, so it has to be reduced across ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.recipes.test_dpo import ROWS, UNPAIRED

ROOT = Path(__file__).resolve().parents[2]


def _curve(run_dir, key):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r and r["step"] > 0]


def _launch(cmd, cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TETHER_CACHE": str(cache)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_two_process_dpo_equals_one_process(loss, tiny_model_dir, tmp_path):
    data = tmp_path / "pref.jsonl"
    rows = (ROWS if loss == "dpo" else UNPAIRED) * 2  # 10 or 14 rows: 2 held out, 8 or 12 train
    held_out = "0.2" if loss == "dpo" else "0.1"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def args(out):
        return ["dpo", f"--model.name_or_path={tiny_model_dir}", f"--run.output_dir={out}",
                f"--data.path={data}", f"--dpo.loss={loss}", "--dpo.beta=0.5",
                "--train.max_steps=4", "--train.batch_size=4", "--train.micro_batch_size=2",
                "--train.lr=3e-2", "--train.warmup_ratio=0.0", "--train.schedule=constant",
                "--train.precision=fp32", "--data.max_length=32", f"--data.eval_fraction={held_out}",
                "--run.progress=false", "--run.tensorboard=false"]

    _launch([sys.executable, "-m", "tether", *args(tmp_path / "one")], tmp_path / "cache1")
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
             "--master_port=29531", "-m", "tether", *args(tmp_path / "two")], tmp_path / "cache2")
    for key in ("loss/dpo", "rewards/margin") + (("kto/kl",) if loss == "kto" else ()):
        one, two = _curve(tmp_path / "one", key), _curve(tmp_path / "two", key)
        assert len(one) == len(two) == 4, key
        for a, b in zip(one, two):
            assert abs(a - b) < 1e-4, (key, one, two)
    margins = _curve(tmp_path / "one", "rewards/margin")
    assert margins[-1] > margins[0] + 1e-3, margins  # it trained
    if loss == "kto":
        assert max(_curve(tmp_path / "one", "kto/kl")) > 0  # z was not clamped to 0 throughout
    evals = [_curve(tmp_path / d, "eval/loss") for d in ("one", "two")]
    assert abs(evals[0][-1] - evals[1][-1]) < 1e-4, evals  # held-out pairs split over 2 ranks
