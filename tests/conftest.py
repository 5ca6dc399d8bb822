"""Shared fixtures: the default tokenizer (real chat template) and tiny random Llama models."""

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def default_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (converted once from the shipped GGUF, then cached)."""
    from tether.config import ModelConfig
    from tether.engine.models import load_tokenizer

    return load_tokenizer(ModelConfig())
