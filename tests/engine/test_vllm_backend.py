"""The vLLM backend without vLLM: backend selection and its errors, LoRA merged into plain
transformers names, vLLM's outputs -> Rollout (by hand), weight sync after an update, and GRPO /
PPO end to end through a stand-in with vLLM's `LLM` shape (tests/engine/fake_vllm.py), in the
trainer process and, for `generation.vllm_mode: server`, in a child process. The same behaviour
against the real vLLM is in test_vllm_real.py (skipped where vLLM is not installed)."""

import copy
import math
import multiprocessing
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from tether.config import GenerationConfig, GRPOConfig, PPOConfig, load_config
from tether.engine import backends, vllm_backend
from tether.engine.backends import make_backend
from tether.engine.generate import SamplingParams, TorchBackend, encode_prompt
from tether.engine.models import tiny_llama
from tether.engine.vllm_backend import VLLMBackend, hf_weights, plain_outputs, rollout_of
from tether.engine.vllm_server import VLLMServerBackend, copy_into, one_line, shared_copy
from tether.errors import ConfigError
from tests.engine.fake_vllm import (CompletionOutput, FakeLLM, FakeSamplingParams, Logprob,
                                    RequestOutput, write_fake_vllm_package)

# --- the stand-in (tests/engine/fake_vllm.py) in place of vllm ---------------------------------


@pytest.fixture
def fake_vllm(monkeypatch):
    """`import vllm` resolves to the stand-in."""
    module = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams)
    monkeypatch.setattr(vllm_backend, "import_vllm", lambda: module)
    FakeLLM.instances = []
    backends._SHARED.clear()
    yield module
    backends._SHARED.clear()


@pytest.fixture
def server_vllm(fake_vllm, tmp_path, monkeypatch):
    """Server mode through the stand-in: the spawned child gets the parent's sys.path, on which
    a fake `vllm` package (tmp_path/fakevllm/vllm) re-exports FakeLLM and FakeSamplingParams.
    The parent itself never imports it (`fake_vllm` answers its `import_vllm`)."""
    root = write_fake_vllm_package(tmp_path / "fakevllm")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH")) if p))
    yield fake_vllm
    assert multiprocessing.active_children() == []  # every test stops its child


@pytest.fixture
def model(default_tokenizer):
    return tiny_llama(vocab_size=len(default_tokenizer), hidden_size=32, layers=2, tie=True,
                      pad_token_id=default_tokenizer.pad_token_id, seed=5).eval()


# --- selection and errors ----------------------------------------------------------------------


def test_hf_backend_is_the_default(model, default_tokenizer):
    backend = make_backend(GenerationConfig(), model, default_tokenizer, precision="fp32")
    assert isinstance(backend, TorchBackend) and not backend.external_sampler
    backend.sync_weights()  # a no-op


def test_bad_generation_keys_are_config_errors(model, default_tokenizer):
    for gen, match in ((GenerationConfig(backend="sglang"), "generation.backend must be one of"),
                       (GenerationConfig(backend="vllm", vllm_mode="serve"),
                        "generation.vllm_mode must be one of colocate, server"),
                       (GenerationConfig(tis_cap=0.0), "tis_cap")):
        with pytest.raises(ConfigError, match=match):
            make_backend(gen, model, default_tokenizer, precision="fp32")
    with pytest.raises(ConfigError, match="generation.backend"):  # a typo names the key
        load_config(GRPOConfig, None, ["--generation.backnd=vllm"])


def test_vllm_missing_is_one_line_config_error(model, default_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ConfigError) as err:
        make_backend(GenerationConfig(backend="vllm"), model, default_tokenizer, precision="fp32")
    message = str(err.value)
    assert "\n" not in message and "pip install 'tether[vllm]'" in message


# --- weights: plain transformers names, LoRA merged without touching the training model --------


def test_hf_weights_of_a_plain_model_are_its_parameters(model):
    got = dict(hf_weights(model))
    assert set(got) == {n for n, _ in model.named_parameters()}
    assert all(torch.equal(got[n], p) for n, p in model.named_parameters())


def test_hf_weights_merge_lora_like_peft(model):
    """W' = W + (alpha / r) * B @ A for every adapted module, as peft's merge_and_unload
    computes it, with the training model left as it was (adapters unmerged)."""
    from tether.config import LoraConfig
    from tether.engine.models import apply_lora

    peft_model = apply_lora(copy.deepcopy(model), LoraConfig(r=4, alpha=8.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at 0: make the adapter do something
    before = {n: p.clone() for n, p in peft_model.named_parameters()}
    got = dict(hf_weights(peft_model))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    assert set(got) == {n for n, _ in merged.named_parameters()}
    for name, p in merged.named_parameters():
        torch.testing.assert_close(got[name], p)
    q = "model.layers.0.self_attn.q_proj.weight"  # by hand for one module
    layer = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    by_hand = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight \
        @ layer.lora_A["default"].weight
    torch.testing.assert_close(got[q], by_hand)
    assert not torch.equal(got[q], layer.base_layer.weight)
    for name, p in peft_model.named_parameters():  # untouched
        assert torch.equal(p, before[name]), name


# --- vLLM's outputs -> Rollout, by hand ----------------------------------------------------------


def test_vllm_outputs_to_rollout_by_hand():
    """Two prompts (lengths 2 and 1), G = 2, pad id 0. vLLM returns each prompt's samples with
    their index (here out of order), token ids up to and including EOS (id 2) or the token that
    completed a stop string, and one {token: Logprob} per generated token:
      prompt 0: sample 0 = [5, 2] (EOS, 'stop'), sample 1 = [7, 8, 9] ('length')
      prompt 1: sample 0 = [4] ('stop', a stop string), sample 1 = [6, 6] ('length')
    -> prompts left-padded [[3, 4], [3, 4], [0, 3], [0, 3]], completions right-padded to 3,
    masks True on the returned tokens, truncated where finish_reason is 'length'."""
    def comp(i, toks, lps, reason):
        return CompletionOutput(i, f"t{i}", toks, [{t: Logprob(lp)} for t, lp in zip(toks, lps)],
                                reason)
    outputs = [RequestOutput([3, 4], [comp(1, [7, 8, 9], [-0.5, -1.5, -2.5], "length"),
                                      comp(0, [5, 2], [-0.1, -0.2], "stop")]),
               RequestOutput([3], [comp(0, [4], [-3.0], "stop"),
                                   comp(1, [6, 6], [-0.25, -0.75], "length")])]
    r = rollout_of([[3, 4], [3]], plain_outputs(outputs), group_size=2, pad_id=0)
    assert r.prompt_ids.tolist() == [[3, 4], [3, 4], [0, 3], [0, 3]]
    assert r.prompt_mask.tolist() == [[True, True]] * 2 + [[False, True]] * 2
    assert r.completion_ids.tolist() == [[5, 2, 0], [7, 8, 9], [4, 0, 0], [6, 6, 0]]
    assert r.completion_mask.tolist() == [[True, True, False], [True, True, True],
                                          [True, False, False], [True, True, False]]
    torch.testing.assert_close(r.logps, torch.tensor([[-0.1, -0.2, 0.0], [-0.5, -1.5, -2.5],
                                                      [-3.0, 0.0, 0.0], [-0.25, -0.75, 0.0]]))
    assert r.truncated.tolist() == [False, True, False, True]
    assert r.texts == ["t0", "t1", "t0", "t1"] and r.entropy is None and r.group_size == 2
    assert r.position_ids()[3].tolist() == [0, 0, 1, 2, 2]  # from the first real prompt token
    with pytest.raises(RuntimeError, match="expected 3"):
        rollout_of([[3, 4], [3]], plain_outputs(outputs), group_size=3, pad_id=0)


# --- weight sync: a sample after an update comes from the updated weights ----------------------


def test_sample_after_update_comes_from_updated_weights(fake_vllm, model, default_tokenizer):
    """The engine starts with random (dummy) weights and gets the policy's before its first
    sample. Zeroing the final norm's weight makes every hidden state 0, so every logit is 0: the
    greedy token is id 0 with log-prob -ln V (V = 49152: -10.8027). Before `sync_weights` the
    engine still samples the old weights; after it, exactly that."""
    backend = make_backend(GenerationConfig(backend="vllm"), model, default_tokenizer,
                           precision="fp32", seed=0)
    assert isinstance(backend, VLLMBackend) and backend.external_sampler
    ids = [encode_prompt(default_tokenizer, "What is 2 + 3?")]
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    first = backend.generate(ids, greedy)
    llm = FakeLLM.instances[0]
    assert llm.reloads == 1 and llm.kwargs["dtype"] == "float32"
    assert first.completion_ids.tolist() == \
        TorchBackend(model, default_tokenizer).generate(ids, greedy).completion_ids.tolist()
    with torch.no_grad():
        model.model.norm.weight.zero_()  # "the optimizer step"
    stale = backend.generate(ids, greedy)
    assert stale.completion_ids.tolist() == first.completion_ids.tolist()  # no copy shared
    backend.sync_weights()
    assert llm.reloads == 2 and llm.prefix_resets == 2 and llm.applied == 2  # refresh_tied_head
    after = backend.generate(ids, greedy)
    assert after.completion_ids.tolist() == [[0, 0, 0, 0]]
    torch.testing.assert_close(after.logps, torch.full((1, 4), -math.log(49152)))


def test_seeded_samples_repeat_and_shared_engine_is_reused(fake_vllm, model, default_tokenizer):
    gen = GenerationConfig(backend="vllm")
    backend = make_backend(gen, model, default_tokenizer, precision="bf16", shared=True)
    ids = [encode_prompt(default_tokenizer, p) for p in ("Hi", "What is 2 + 3?")]
    params = SamplingParams(max_new_tokens=6, group_size=3)
    a = backend.generate(ids, params, generator=torch.Generator().manual_seed(7))
    b = backend.generate(ids, params, generator=torch.Generator().manual_seed(7))
    assert a.completion_ids.tolist() == b.completion_ids.tolist() and len(a.texts) == 6
    assert FakeLLM.instances[0].kwargs["dtype"] == "bfloat16"
    other = copy.deepcopy(model)  # the next checkpoint of an evaluation: same engine, new weights
    again = make_backend(gen, other, default_tokenizer, precision="bf16", shared=True)
    assert again is backend and len(FakeLLM.instances) == 1
    again.generate(ids, params)
    assert FakeLLM.instances[0].reloads == 2


# --- server mode: the engine in a child process -----------------------------------------------


def test_server_sample_after_update_comes_from_updated_weights(server_vllm, model,
                                                               default_tokenizer):
    """test_sample_after_update_comes_from_updated_weights with the engine in a child process
    (made shared, so `close_shared` stops it). The weights reach the child through shared memory:
    allocated at the first push, written in place at the next. Before `sync_weights` the child
    still samples the old weights; after it, token 0 with log-prob -ln 49152 = -10.8027."""
    gen = GenerationConfig(backend="vllm", vllm_mode="server")
    backend = make_backend(gen, model, default_tokenizer, precision="fp32", shared=True)
    assert isinstance(backend, VLLMServerBackend) and backend.external_sampler
    try:
        ids = [encode_prompt(default_tokenizer, "What is 2 + 3?")]
        greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
        first = backend.generate(ids, greedy)
        process, buffers = backend.process, dict(backend._weights)
        assert process.is_alive() and backend.syncs == 1
        assert all(t.is_shared() for t in buffers.values())
        assert first.completion_ids.tolist() == \
            TorchBackend(model, default_tokenizer).generate(ids, greedy).completion_ids.tolist()
        with torch.no_grad():
            model.model.norm.weight.zero_()  # "the optimizer step"
        stale = backend.generate(ids, greedy)
        assert stale.completion_ids.tolist() == first.completion_ids.tolist()
        backend.sync_weights()
        norm = backend._weights["model.norm.weight"]
        assert norm is buffers["model.norm.weight"] and not norm.any()  # in place
        after = backend.generate(ids, greedy)
        assert after.completion_ids.tolist() == [[0, 0, 0, 0]]
        torch.testing.assert_close(after.logps, torch.full((1, 4), -math.log(49152)))
    finally:
        backends.close_shared()
    assert not process.is_alive() and process.exitcode == 0 and not backends._SHARED


def test_server_error_is_one_line_and_close_stops_the_child(server_vllm, model,
                                                            default_tokenizer):
    """A prompt token outside the vocabulary fails in the child (the embedding's IndexError);
    the parent raises it as one line naming the mode, and the server keeps serving. close()
    stops the child: "close", then it exits by itself (exit code 0)."""
    backend = make_backend(GenerationConfig(backend="vllm", vllm_mode="server"), model,
                           default_tokenizer, precision="fp32")
    greedy = SamplingParams(max_new_tokens=2, temperature=0.0)
    try:
        with pytest.raises(RuntimeError) as err:
            backend.generate([[len(default_tokenizer) + 5]], greedy)
        message = str(err.value)
        assert message.startswith("generation.vllm_mode: server: generate failed: IndexError")
        assert "\n" not in message
        process = backend.process
        assert process.is_alive()
        assert backend.generate([[1, 2]], greedy).completion_ids.shape[0] == 1
    finally:
        backend.close()
    assert not process.is_alive() and process.exitcode == 0 and backend.process is None


def test_shared_weights_and_one_line_by_hand():
    """shared_copy: equal values in shared memory; copy_into: in place, the same names and
    shapes or a RuntimeError; one_line collapses newlines."""
    weights = [("a", torch.tensor([1.0, 2.0])), ("b", torch.zeros(2, 2))]
    buffers = shared_copy(weights)
    a = buffers["a"]
    assert a.is_shared() and a.tolist() == [1.0, 2.0] and a is not weights[0][1]
    copy_into(buffers, [("a", torch.tensor([3.0, 4.0])), ("b", torch.ones(2, 2))])
    assert buffers["a"] is a and a.tolist() == [3.0, 4.0] and buffers["b"].sum() == 4
    with pytest.raises(RuntimeError, match="weight a \\(3,\\) does not match"):
        copy_into(buffers, [("a", torch.zeros(3))])
    with pytest.raises(RuntimeError, match="lacks \\['b'\\]"):
        copy_into(buffers, [("a", torch.zeros(2))])
    assert one_line(ValueError("bad\n  thing")) == "ValueError: bad thing"


# --- the recipes through the stand-in -----------------------------------------------------------


def _metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _grpo_cfg(tiny_model_dir, tmp_path, *extra: str) -> GRPOConfig:
    """Two GRPO steps of 2 prompts x 4 samples on the tiny model, sampling through vLLM."""
    return load_config(GRPOConfig, None, [
        f"--model.name_or_path={tiny_model_dir}", f"--run.output_dir={tmp_path / 'run'}",
        "--model.lora.r=4", "--train.max_steps=2", "--train.precision=fp32",
        "--grpo.group_size=4", "--grpo.prompts_per_step=2", "--grpo.max_new_tokens=6",
        "--grpo.task_size=16", "--run.eval_generations=2", "--grpo.rewards=[format]",
        "--run.progress=false", "--run.tensorboard=false", "--run.report=false",
        "--generation.backend=vllm", *extra])


@pytest.mark.parametrize("tis", [False, True])
def test_grpo_through_vllm_stand_in(fake_vllm, tiny_model_dir, tmp_path, tis):
    """Every step samples through the engine, pushes the new weights after its update and logs
    generation/logp_diff (the stand-in samples in fp32 like the trainer: the difference is
    rounding); the held-out greedy evaluation samples through it too."""
    cfg = _grpo_cfg(tiny_model_dir, tmp_path, f"--generation.tis={str(tis).lower()}")
    from tether.recipes import grpo

    out = grpo.run(cfg)
    llm = FakeLLM.instances[0]
    assert len(FakeLLM.instances) == 1 and llm.reloads == 1 + 2  # first sample + 2 steps
    for row in out["history"]:
        assert 0 <= row["generation/logp_diff"] < 1e-3, row["generation/logp_diff"]
        assert math.isnan(row["policy/entropy"])  # vLLM returns no entropy
    assert any("generation/logp_diff" in r for r in _metrics(tmp_path / "run"))


def test_grpo_through_vllm_server_stand_in(server_vllm, tiny_model_dir, tmp_path):
    """test_grpo_through_vllm_stand_in's run with the engine in a child process: the sampler's
    log-probs match the trainer's every step (the child got each update), and the run stops
    the child at its end (the fixture checks no child is left)."""
    cfg = _grpo_cfg(tiny_model_dir, tmp_path, "--generation.vllm_mode=server")
    from tether.recipes import grpo

    out = grpo.run(cfg)
    assert len(out["history"]) == 2 and not FakeLLM.instances  # no engine in this process
    for row in out["history"]:
        assert 0 <= row["generation/logp_diff"] < 1e-3, row["generation/logp_diff"]


def test_ppo_through_vllm_stand_in(fake_vllm, tiny_model_dir, tmp_path):
    cfg = load_config(PPOConfig, None, [
        f"--model.name_or_path={tiny_model_dir}", f"--run.output_dir={tmp_path / 'run'}",
        "--train.max_steps=2", "--train.batch_size=4", "--train.micro_batch_size=2",
        "--train.precision=fp32", "--ppo.max_new_tokens=6", "--ppo.update_epochs=1",
        "--run.eval_generations=2", "--run.progress=false", "--run.tensorboard=false",
        "--run.report=false", "--generation.backend=vllm", "--generation.tis=true"])
    from tether.recipes import ppo

    out = ppo.run(cfg)
    assert FakeLLM.instances[0].reloads == 1 + 2
    assert all(0 <= h["generation/logp_diff"] < 1e-3 for h in out["history"])


def test_vllm_usage_statistics_are_off_unless_the_user_says_otherwise(monkeypatch):
    """Before vllm is imported, VLLM_NO_USAGE_STATS and DO_NOT_TRACK are set to 1; a value the
    user set is kept."""
    import os
    import sys
    import types

    from tether.engine import vllm_backend

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.delenv("VLLM_NO_USAGE_STATS", raising=False)
    monkeypatch.setenv("DO_NOT_TRACK", "0")
    vllm_backend.import_vllm()
    assert os.environ["VLLM_NO_USAGE_STATS"] == "1" and os.environ["DO_NOT_TRACK"] == "0"
