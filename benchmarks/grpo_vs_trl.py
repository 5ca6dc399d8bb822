"""GRPO rollout + update speed and memory: tether vs TRL's GRPOTrainer (run by hand).

Setup once (TRL is never a tether dependency; its venv is gitignored):

    python3 -m venv benchmarks/.venv-trl
    benchmarks/.venv-trl/bin/pip install torch==2.13.0 trl

Run on an idle machine (results go in benchmarks/README.md):

    .venv/bin/python benchmarks/grpo_vs_trl.py --trl-python benchmarks/.venv-trl/bin/python

Check that both halves start (2 steps each):

    .venv/bin/python benchmarks/grpo_vs_trl.py --steps 2 \
        --trl-python benchmarks/.venv-trl/bin/python

Setting (issue 5): the default model (SmolLM2-135M-Instruct, the fp32 safetensors directory tether
converts once into its cache), full fine-tune, `--precision` (bf16 autocast over fp32 weights by
default, the default of both trainers on a CPU with native bf16; or fp32), 4 prompts x 8
samples x at most 32 new tokens per step, temperature 1, loss GRPO (group-normalised advantages, per-sequence mean), beta
0 (no reference model in either trainer), one optimizer step per rollout, constant lr 1e-6, no
evaluation. The prompts are tether's built-in arithmetic prompts (conversational, with the format
system message), written once to a JSONL file that both trainers read; the reward is the same
pure-Python function in both (`bench_reward` below: 1 for a reply ending in 'Answer: <int>' plus
1 for the right integer).

Each trainer runs in its own subprocess (tether with this interpreter, TRL with `--trl-python`),
with the same number of torch threads (`--threads`, default all cores). Reported per trainer:
- `completions_per_s`: completions generated and trained on per second of step wall time
  (generation + scoring + update), over the steps after the first (warm-up).
- `gen_tokens_per_s`: generated tokens per second of step wall time over the same steps. The two
  trainers sample different completions (EOS ends a completion early), so both rates are shown;
  `mean_completion_tokens` says how long the completions were.
- `step_s`: mean seconds per step after the first; `wall_s`: the child's whole run, model
  loading included.
- `peak_rss_mb`: the child's peak resident memory (`ru_maxrss`).
Targets of the issue: tether >= 3x TRL's completions/s, <= 0.6x its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS, GROUP, NEW_TOKENS, LR = 4, 8, 32, 1e-6
_ANSWER = re.compile(r"Answer:\s*(-?\d+)\s*$")


def bench_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1 if the reply ends with 'Answer: <int>', plus 1 if that integer is the answer. Plain
    Python, no tether import: the TRL child uses it as it is. TRL passes conversational
    completions as lists of messages, tether as strings."""
    out = []
    for completion, a in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        found = _ANSWER.search(text.strip())
        out.append(0.0 if found is None else 1.0 + float(int(found.group(1)) == int(a)))
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady(values: list[float], seconds: list[float]) -> float:
    """sum(values) / sum(seconds) over the steps after the first (all when only one)."""
    if len(values) > 1:
        values, seconds = values[1:], seconds[1:]
    return sum(values) / sum(seconds)


# ------------------------------------------------------------------------------ data (parent)


def build_data(path: Path, n_prompts: int) -> str:
    """Write n_prompts built-in arithmetic prompt rows; return the model directory."""
    from tether.config import GRPOParams, ModelConfig
    from tether.data.prompts import builtin_prompt_rows
    from tether.engine.models import resolve_model_dir

    rows = builtin_prompt_rows(n_prompts, difficulty=GRPOParams().task_difficulty,
                               shots=GRPOParams().task_shots)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(resolve_model_dir(ModelConfig()))


# ------------------------------------------------------------------------------ children


def child_tether(data: str, model_dir: str, steps: int, precision: str) -> dict:
    from tether.config import GRPOConfig, load_config
    from tether.recipes import grpo

    sys.path.insert(0, str(Path(__file__).parent))  # bench_reward as grpo_vs_trl:bench_reward
    out = tempfile.mkdtemp(prefix="grpo-bench-tether-")
    cfg = load_config(GRPOConfig, None, [
        f"--model.name_or_path={model_dir}", f"--data.path={data}", "--data.eval_fraction=0",
        f"--train.max_steps={steps}", f"--train.lr={LR}", "--train.schedule=constant",
        "--train.warmup_ratio=0", f"--train.precision={precision}", "--train.weight_decay=0",
        "--train.micro_batch_size=8", "--grpo.loss_type=grpo", "--grpo.beta=0",
        f"--grpo.group_size={GROUP}", f"--grpo.prompts_per_step={PROMPTS}",
        f"--grpo.max_new_tokens={NEW_TOKENS}", "--grpo.temperature=1.0",
        "--grpo.rewards=grpo_vs_trl:bench_reward", f"--run.output_dir={out}",
        "--run.progress=false", "--run.tensorboard=false", "--run.eval_generations=0"])
    t0 = time.perf_counter()
    grpo.run(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    shutil.rmtree(out)  # its final checkpoint (weights and AdamW moments) is 1.5 GB
    steps_ = [r for r in rows if "reward/mean" in r]
    seconds = [r["timing/generate"] + r["timing/score"] + r["timing/update"] for r in steps_]
    completions = [PROMPTS * GROUP] * len(steps_)
    tokens = [r["completions/mean_length"] * PROMPTS * GROUP for r in steps_]
    return {"completions_per_s": steady(completions, seconds),
            "gen_tokens_per_s": steady(tokens, seconds), "steps": len(steps_),
            "step_s": sum(seconds[1:] or seconds) / len(seconds[1:] or seconds),
            "generate_s": sum(r["timing/generate"] for r in steps_) / len(steps_),
            "mean_completion_tokens": sum(tokens) / sum(completions), "wall_s": wall,
            "peak_rss_mb": peak_rss_mb(), "final_reward": steps_[-1]["reward/mean"]}


def child_trl(data: str, model_dir: str, steps: int, precision: str) -> dict:
    import dataclasses

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    completion_tokens: list[int] = []

    def counted_reward(prompts, completions, completion_ids=None, **kwargs):
        if completion_ids is not None:
            completion_tokens.append(sum(len(c) for c in completion_ids))
        return bench_reward(prompts, completions, **kwargs)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.rewards, self._t = [], [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self._t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.rewards.append(logs["reward"])

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    train = datasets.load_dataset("json", data_files=data, split="train")
    wanted = dict(output_dir=tempfile.mkdtemp(prefix="grpo-bench-trl-"), max_steps=steps,
                  per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
                  num_generations=GROUP, max_completion_length=NEW_TOKENS, temperature=1.0,
                  learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, beta=0.0, loss_type="grpo", num_iterations=1,
                  use_cpu=True, bf16=precision == "bf16", fp16=False, logging_steps=1,
                  save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0, disable_tqdm=True,
                  use_vllm=False)
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    dropped = sorted(set(wanted) - known)  # options this TRL version does not have
    args = GRPOConfig(**{k: v for k, v in wanted.items() if k in known})
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                          reward_funcs=[counted_reward], callbacks=[timer])
    trainer.train()
    wall = time.perf_counter() - t0
    n = PROMPTS * GROUP
    tokens = [float(t) for t in completion_tokens[:len(timer.seconds)]] or [float("nan")]
    import trl

    return {"completions_per_s": steady([n] * len(timer.seconds), timer.seconds),
            "gen_tokens_per_s": steady(tokens, timer.seconds[:len(tokens)]),
            "steps": len(timer.seconds),
            "step_s": sum(timer.seconds[1:] or timer.seconds) / len(timer.seconds[1:] or
                                                                    timer.seconds),
            "generate_s": None, "mean_completion_tokens": sum(tokens) / (n * len(tokens)),
            "wall_s": wall, "peak_rss_mb": peak_rss_mb(),
            "final_reward": timer.rewards[-1] if timer.rewards else None,
            "trl_version": trl.__version__, "options_not_in_this_trl": dropped}


# ------------------------------------------------------------------------------ parent


def run_child(python: str, name: str, data: str, model_dir: str, steps: int, threads: int,
              precision: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "TETHER_CACHE": os.environ.get("TETHER_CACHE", str(Path.home() / ".cache/tether"))}
    cmd = [python, __file__, "--child", name, "--data", data, "--model-dir", model_dir,
           "--steps", str(steps), "--threads", str(threads), "--precision", precision]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trl-python", help="python of a venv with trl installed")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="both trainers: bf16 autocast over fp32 weights (both trainers' "
                             "default on a CPU with native bf16), or fp32")
    parser.add_argument("--only", choices=["tether", "trl"], help="run one side only")
    parser.add_argument("--child", choices=["tether", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        result = (child_tether if args.child == "tether" else child_trl)(
            args.data, args.model_dir, args.steps, args.precision)
        print(json.dumps(result))
        return
    if args.only != "tether" and not args.trl_python:
        parser.error("--trl-python is required (or --only tether); see the docstring for setup")
    work = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    data = work / "prompts.jsonl"
    model_dir = build_data(data, max(64, args.steps * PROMPTS))
    print(f"{PROMPTS} prompts x {GROUP} samples x <= {NEW_TOKENS} new tokens per step, "
          f"{args.steps} steps, {args.threads} threads, model {model_dir}", flush=True)
    results = {}
    for name, python in (("tether", sys.executable), ("trl", args.trl_python)):
        if args.only in (None, name):
            results[name] = r = run_child(python, name, str(data), model_dir, args.steps,
                                          args.threads, args.precision)
            print(f"{name:>6}: {r['completions_per_s']:6.2f} completions/s, "
                  f"{r['gen_tokens_per_s']:7.1f} generated tokens/s "
                  f"({r['mean_completion_tokens']:.1f} per completion), {r['step_s']:.1f} s/step, "
                  f"wall {r['wall_s']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MiB, "
                  f"final reward {r['final_reward']}", flush=True)
    if len(results) == 2:
        t, r = results["tether"], results["trl"]
        print(f"tether / TRL: {t['completions_per_s'] / r['completions_per_s']:.2f}x "
              f"completions/s (target >= 3x), {t['peak_rss_mb'] / r['peak_rss_mb']:.2f}x peak "
              f"RSS (target <= 0.6x)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
