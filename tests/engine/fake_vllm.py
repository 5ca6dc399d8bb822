"""A stand-in with the shape of vllm.LLM / vllm.SamplingParams / vLLM's outputs, importable by
the tests and by a spawned server child (which sees a fake `vllm` package that re-exports these:
`write_fake_vllm_package`)."""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tether.engine.generate import SamplingParams, TorchBackend


@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    logprobs: list | None  # one {token_id: Logprob} per generated token
    finish_reason: str


@dataclass
class RequestOutput:
    prompt_token_ids: list
    outputs: list = field(default_factory=list)


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class FakeLLM:
    """vllm.LLM's surface used by VLLMBackend: built from a weightless model directory with
    load_format="dummy" (random weights), weights only through `collective_rpc("reload_weights",
    ...)` (strict names: a plain transformers checkpoint's), sampling by a private transformers
    model with tether's own sampler, results shaped like vLLM's RequestOutputs."""

    instances: list = []

    def __init__(self, **kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        assert kwargs["load_format"] == "dummy" and kwargs["logprobs_mode"] == "processed_logprobs"
        self.kwargs = kwargs
        config = AutoConfig.from_pretrained(kwargs["model"])
        with torch.random.fork_rng():
            torch.manual_seed(123)
            self.model = AutoModelForCausalLM.from_config(config).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs["tokenizer"])
        self.reloads, self.prefix_resets, self.applied = 0, 0, 0
        FakeLLM.instances.append(self)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"]
        weights = dict(kwargs["weights_iterator"])
        expected = dict(self.model.named_parameters())  # tied weights once, as in vLLM
        assert set(weights) == set(expected), set(weights) ^ set(expected)
        with torch.no_grad():
            for name, tensor in weights.items():
                expected[name].copy_(tensor)
        self.reloads += 1
        return [None]

    def apply_model(self, func):
        self.applied += 1
        return [func(self.model)]

    def reset_prefix_cache(self):
        self.prefix_resets += 1

    def generate(self, prompts, sp, use_tqdm=False):
        params = SamplingParams(max_new_tokens=sp.max_tokens, temperature=sp.temperature,
                                top_p=sp.top_p, top_k=max(0, sp.top_k), stop=tuple(sp.stop or ()),
                                group_size=sp.n)
        gen = None if sp.seed is None else torch.Generator().manual_seed(sp.seed)
        r = TorchBackend(self.model, self.tokenizer).generate(
            [p["prompt_token_ids"] for p in prompts], params, generator=gen)
        out = [RequestOutput(p["prompt_token_ids"]) for p in prompts]
        for row in reversed(range(len(r.texts))):  # reversed: the backend must sort by index
            toks = r.completion_ids[row][r.completion_mask[row]].tolist()
            lps = r.logps[row][r.completion_mask[row]].tolist()
            out[row // sp.n].outputs.append(CompletionOutput(
                row % sp.n, r.texts[row], toks, [{t: Logprob(lp)} for t, lp in zip(toks, lps)],
                "length" if r.truncated[row] else "stop"))
        return out


def write_fake_vllm_package(root: Path) -> Path:
    """root/vllm/__init__.py re-exporting the stand-ins as vllm.LLM and vllm.SamplingParams;
    returns root, the directory to put on sys.path."""
    (root / "vllm").mkdir(parents=True, exist_ok=True)
    (root / "vllm" / "__init__.py").write_text(
        "from tests.engine.fake_vllm import FakeLLM as LLM\n"
        "from tests.engine.fake_vllm import FakeSamplingParams as SamplingParams\n")
    return root
