"""SFT end to end on a tiny model: loss falls, export loads (resume: test_resume.py)."""

import torch

from tests.conftest import tiny_sft_overrides
from tether.config import SFTConfig, load_config
from tether.recipes import sft


def _run(model_dir, out_dir, *extra):
    return sft.run(load_config(SFTConfig, None, tiny_sft_overrides(model_dir, out_dir, *extra)))


def test_tiny_sft_lowers_loss(tiny_model_dir, tmp_path):
    out = _run(tiny_model_dir, tmp_path / "run", "--train.max_steps=12")
    losses = out["losses"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert out["eval_after"] < out["eval_before"]
    saved = load_config(SFTConfig, tmp_path / "run" / "config.yaml")
    assert saved.train.max_steps == 12  # the resolved config is saved in the run directory


def test_export_writes_plain_hf_directory(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tether.cli import main

    out = _run(tiny_model_dir, tmp_path / "run", "--train.max_steps=2")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    trained = out["policy"].model
    for (name, p), (_, q) in zip(trained.named_parameters(), loaded.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=0, rtol=0, msg=name)
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()


def test_lora_trains_adapter_only_and_merges_on_export(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tether.cli import main

    out = _run(tiny_model_dir, tmp_path / "run", "--train.max_steps=3", "--model.lora.r=4",
               "--train.lr=1e-2")
    trainable = [n for n, p in out["policy"].named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out["policy"].eval()
        want = out["policy"].model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        before = base(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - before).abs().max() > 1e-4  # the adapter changed the model
