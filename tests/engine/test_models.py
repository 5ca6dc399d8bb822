"""Model sources: 'default', a local HF directory, a .gguf file; clear errors otherwise."""

import pytest

from tether.config import LoraConfig, ModelConfig
from tether.engine import models
from tether.errors import ConfigError


def test_gguf_file_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    """The conversion is keyed by the file's content: the same bytes under either spelling of
    the path share one; two files of one name and size that differ in one byte do not."""
    import hashlib

    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF" + b"x" * 6)  # the magic bytes, then anything
    calls = []
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "convert_gguf", lambda src, out: calls.append((src, out)) or out)
    out = models.resolve_model_dir(ModelConfig(name_or_path=str(gguf)))
    digest = hashlib.sha256(b"GGUF" + b"x" * 6).hexdigest()[:16]
    assert calls == [(gguf, tmp_path / "cache" / "models" / f"m.Q4-{digest}")]
    assert out == tmp_path / "cache" / "models" / f"m.Q4-{digest}"
    models.resolve_model_dir(ModelConfig(name_or_path=str(tmp_path), gguf_file="m.Q4.gguf"))
    assert calls[1] == calls[0]
    other = tmp_path / "other" / "m.Q4.gguf"  # same name, same size, one byte different
    other.parent.mkdir()
    other.write_bytes(b"GGUF" + b"x" * 5 + b"y")
    assert models.resolve_model_dir(ModelConfig(name_or_path=str(other))) != out


def test_local_directory_and_errors(tmp_path, tiny_model_dir):
    assert models.resolve_model_dir(ModelConfig(name_or_path=str(tiny_model_dir))) == tiny_model_dir
    with pytest.raises(ConfigError, match="is not a model directory .*reaches no model hub"):
        models.resolve_model_dir(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M"))
    with pytest.raises(ConfigError, match="model.gguf_file: no GGUF file"):
        models.resolve_model_dir(ModelConfig(name_or_path=str(tmp_path), gguf_file="none.gguf"))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="loads safetensors only"):
        models.load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "pickled")))


def test_lora_with_unknown_target_module_names_it(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(r=2, target_modules=["qkv"]))
    with pytest.raises(ConfigError, match=r"no module named \['qkv'\]"):
        models.load_causal_lm(cfg)
