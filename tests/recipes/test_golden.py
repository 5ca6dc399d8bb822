"""Golden loss curves: a tiny deterministic SFT run must reproduce its committed curve.

A change that should not change the maths (refactor, speed-up) keeps these numbers; a change that
does must say why and regenerate them: `TETHER_REGEN_GOLDEN=1 pytest tests/recipes/test_golden.py`.
"""

import json
import os
from pathlib import Path

import pytest

from tests.conftest import tiny_sft_overrides
from tether.config import SFTConfig, load_config
from tether.recipes import sft

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name, extra", [
    ("sft_tiny", []),
    ("sft_tiny_packed", ["--data.packing=true", "--train.batch_size=2",
                         "--train.micro_batch_size=1", "--data.max_length=128"]),
])
def test_golden_loss_curve(tiny_model_dir, tmp_path, name, extra):
    cfg = load_config(SFTConfig, None, tiny_sft_overrides(
        tiny_model_dir, tmp_path / name, "--run.eval_generations=0", *extra))
    losses = sft.run(cfg)["losses"]
    path = GOLDEN / f"{name}.json"
    if os.environ.get("TETHER_REGEN_GOLDEN"):
        path.write_text(json.dumps({"overrides": extra, "losses": losses}, indent=1) + "\n")
    golden = json.loads(path.read_text())["losses"]
    assert losses == pytest.approx(golden, rel=1e-4, abs=1e-6)
    assert losses[-1] < losses[0]
