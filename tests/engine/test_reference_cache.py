"""The reference log-prob cache of the DPO family: a damaged file is recomputed, never an error."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from tether.engine.reference import cached_pair_logps


def _scores(missing):
    return torch.tensor([[-1.0 - i, -2.0 - i] for i in missing])


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(p.read_bytes()[:40]),  # truncated (killed while copying, disk full)
    lambda p: p.write_bytes(b"not a safetensors file"),
    lambda p: save_file({"other": torch.zeros(2)}, p),  # readable, but no `logps`
], ids=["truncated", "garbage", "no_logps"])
def test_a_damaged_cache_is_said_scored_afresh_and_replaced(tmp_path, capsys, damage):
    path = tmp_path / "ref.safetensors"
    first, _ = cached_pair_logps(3, [0, 1, 2], path, use_cache=True, score=_scores)
    damage(path)
    asked = []
    logps, note = cached_pair_logps(3, [0, 2], path, use_cache=True,
                                    score=lambda m: asked.append(m) or _scores(m))
    assert asked == [[0, 2]]  # everything the run needs is scored again
    torch.testing.assert_close(logps[[0, 2]], first[[0, 2]], atol=0, rtol=0)
    assert "unreadable" in capsys.readouterr().out
    assert load_file(path)["logps"].shape == (3, 2)  # the cache is whole again
    _, again = cached_pair_logps(3, [0, 2], path, use_cache=True, score=_scores)
    assert again.startswith("reference log-probs: read from the cache")
