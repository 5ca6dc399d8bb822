"""Shared fixtures: the default tokenizer (real chat template) and tiny random Llama models."""

import os

import pytest
import torch

# TETHER_TEST_THREADS: the golden-curve spread measurement (scripts/golden_spread.py) varies it
torch.set_num_threads(int(os.environ.get("TETHER_TEST_THREADS", 0))
                      or max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def default_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (converted once from the shipped GGUF, then cached)."""
    from tether.config import ModelConfig
    from tether.engine.models import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_tokenizer):
    """A tiny random Llama (tied embeddings, like SmolLM2) saved as an HF directory with the
    default tokenizer, so recipes run end to end in seconds."""
    from tether.engine.models import tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab_size=len(default_tokenizer), tie=True,
                       pad_token_id=default_tokenizer.pad_token_id)
    model.save_pretrained(path, safe_serialization=True)
    default_tokenizer.save_pretrained(path)
    return path


def tiny_sft_overrides(model_dir, out_dir, *extra):
    """Overrides for a seconds-long SFT run on the built-in set with a tiny model."""
    return [f"--model.name_or_path={model_dir}", f"--run.output_dir={out_dir}",
            "--train.max_steps=6", "--train.batch_size=4", "--train.micro_batch_size=2",
            "--train.lr=2e-2", "--train.warmup_ratio=0.0", "--train.schedule=constant", "--train.precision=fp32",
            "--data.max_length=64", "--data.eval_fraction=0.05", "--run.progress=false",
            "--run.tensorboard=false", *extra]
