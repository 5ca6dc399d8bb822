"""2 CPU processes under torchrun with FSDP2 give the loss curve of 1 process (same batch)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import tiny_sft_overrides

ROOT = Path(__file__).resolve().parents[2]


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/sft"] for r in rows if "loss/sft" in r]


def _launch(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_process_fsdp2_equals_one_process(tiny_model_dir, tmp_path):
    args = tiny_sft_overrides(tiny_model_dir, tmp_path / "one", "--train.max_steps=5")
    _launch([sys.executable, "-m", "tether", "sft", *args])
    args = tiny_sft_overrides(tiny_model_dir, tmp_path / "two", "--train.max_steps=5")
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
             "--master_port=29517", "-m", "tether", "sft", *args])
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-4, (one, two)
    assert one[-1] < one[0]
