"""DPO training speed and memory: tether vs TRL's DPOTrainer on the same data (run by hand).

Setup once (TRL is never a tether dependency; its venv is gitignored):

    python3 -m venv benchmarks/.venv-trl
    benchmarks/.venv-trl/bin/pip install torch==2.13.0 trl

Run on an idle machine (results go in benchmarks/README.md):

    .venv/bin/python benchmarks/dpo_vs_trl.py --trl-python benchmarks/.venv-trl/bin/python

Check that both halves start (1 step each, a few minutes on 2 cores):

    .venv/bin/python benchmarks/dpo_vs_trl.py --trl-python benchmarks/.venv-trl/bin/python --steps 1

Setting (issue 3): the default model (SmolLM2-135M-Instruct, the fp32 safetensors directory tether
converts once into its cache), full fine-tune, `--precision` (bf16 autocast over fp32 weights by
default, the default of both trainers on a CPU with native bf16; or fp32), sigmoid DPO with
beta 0.1, 4 pairs per optimizer step in one micro-batch, constant lr 1e-6, gradient clipping at
`--max-grad-norm` (1.0, both trainers' default; 0 turns it off in both, and tether then steps each
parameter in backward), no evaluation, no checkpoints. The data are
`steps x 4` conversational pairs built from tether's built-in sentiment set: each completion is
lengthened with other completions of the set and cut so that prompt + completion is about
`--tokens` (115) tokens, the pairs written once to a JSONL file that both trainers read.

Five trainers: `tether` (defaults: each pair's prompt runs once, the lm_head only on completion
tokens, prompt and completion columns padded to multiples of 16 so that batch shapes repeat),
`tether-gc` (the same with `train.gradient_checkpointing=true`: activations recomputed in
backward, prompts no longer shared), `tether-pad0` (the defaults with
`data.pad_to_multiple_of=0`: each batch padded to its own longest prompt and completion only),
`trl` (as installed) and `trl-alloc` (TRL again with
glibc's malloc thresholds set through the environment to the values tether sets for itself in
`engine/dist.keep_freed_host_memory`, so that the allocator's share of the difference shows).
Each runs in its own subprocess (tether with this interpreter, TRL with `--trl-python`),
with the same number of torch threads (`--threads`, default all cores). Reported per trainer:
- `tokens_per_s`: non-padding tokens of the chosen and rejected sequences (each trainer counts
  its own batches) divided by the wall time of the optimizer steps, over the steps after the
  first (warm-up). TRL's steps include its reference forward (the default
  `precompute_ref_log_probs=False`); tether's reference log-probs are computed once before
  training (and cached across runs; the cache is off here so that the pass is timed every run).
- `tokens_per_s_incl_reference`: all steps' tokens divided by (all steps' time + tether's one
  reference pass); for TRL the same as its all-steps rate.
- `wall_s`: the child's whole run, model loading included.
- `peak_rss_mb`: the child's peak resident memory (`ru_maxrss`).
Targets of the issue: tether >= 2.5x TRL's tokens/s, <= 0.7x its peak RSS.
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
from functools import partial
from pathlib import Path

PAIRS_PER_STEP = 4
CHILDREN = ["tether", "tether-gc", "tether-pad0", "trl", "trl-alloc"]
LR, BETA = 1e-6, 0.1


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady_rate(tokens: list[float], seconds: list[float]) -> float:
    """tokens/s over the steps after the first (all steps when there is only one)."""
    if len(tokens) > 1:
        tokens, seconds = tokens[1:], seconds[1:]
    return sum(tokens) / sum(seconds)


# ------------------------------------------------------------------------------ data (parent)


def build_data(path: Path, n_pairs: int, target_tokens: int) -> tuple[str, float]:
    """Write n_pairs conversational pairs of about `target_tokens` tokens (prompt + completion)
    each; return (the model directory, mean tokens per pair as tether tokenises them)."""
    from tether.config import DataConfig, ModelConfig
    from tether.data.preference import builtin_sentiment_rows, tokenize_preference_rows
    from tether.engine.models import load_tokenizer, resolve_model_dir

    tok = load_tokenizer(ModelConfig())
    source = builtin_sentiment_rows()
    pool = [r[k][0]["content"] for r in source for k in ("chosen", "rejected")]
    rows = []
    for i in range(n_pairs):
        row = source[i % len(source)]
        prompt_len = len(tok.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False))
        budget = target_tokens - prompt_len - 2  # <|im_end|> and the newline after it
        out = {"prompt": row["prompt"]}
        for j, side in enumerate(("chosen", "rejected")):
            text, k = row[side][0]["content"], 7 * i + j + 101  # not itself
            while len(tok(text, add_special_tokens=False)["input_ids"]) < budget:
                text += " " + pool[k % len(pool)]
                k += 13
            ids = tok(text, add_special_tokens=False)["input_ids"][:budget]
            out[side] = [{"role": "assistant", "content": tok.decode(ids).strip()}]
        rows.append(out)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = tokenize_preference_rows(list(enumerate(rows, 1)), tok, DataConfig(max_length=4096),
                                     str(path), unpaired=False)
    mean = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs) / len(pairs)
    return str(resolve_model_dir(ModelConfig())), mean


# ------------------------------------------------------------------------------ children


def child_tether(data: str, model_dir: str, steps: int, precision: str, max_grad_norm: float,
                 checkpointing: bool = False, pad_to_multiple_of: int = 16) -> dict:
    from tether.config import DPOConfig, load_config
    from tether.recipes import dpo

    out = tempfile.mkdtemp(prefix="dpo-bench-tether-")
    cfg = load_config(DPOConfig, None, [
        f"--model.name_or_path={model_dir}", f"--data.path={data}", "--data.eval_fraction=0",
        "--data.max_length=1024", f"--train.max_steps={steps}",
        f"--train.batch_size={PAIRS_PER_STEP}", f"--train.micro_batch_size={PAIRS_PER_STEP}",
        f"--train.lr={LR}", "--train.schedule=constant", "--train.warmup_ratio=0",
        f"--train.precision={precision}", f"--train.max_grad_norm={max_grad_norm}",
        "--train.weight_decay=0", "--dpo.loss=dpo", f"--dpo.beta={BETA}",
        "--dpo.cache_reference=false", f"--run.output_dir={out}", "--run.progress=false",
        "--run.tensorboard=false", "--run.eval_generations=0",
        f"--train.gradient_checkpointing={str(checkpointing).lower()}",
        f"--data.pad_to_multiple_of={pad_to_multiple_of}"])
    t0 = time.perf_counter()
    dpo.run(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    shutil.rmtree(out)  # its final checkpoint (weights and AdamW moments) is 1.5 GB
    steps_ = [r for r in rows if "loss/dpo" in r]
    seconds = [r["time/step"] for r in steps_]
    tokens = [r["tokens/per_second"] * r["time/step"] for r in steps_]
    reference_s = next(r["time/reference"] for r in rows if "time/reference" in r)
    return {"tokens_per_s": steady_rate(tokens, seconds), "steps": len(steps_),
            "step_s": sum(seconds) / len(seconds), "tokens_per_step": sum(tokens) / len(tokens),
            "reference_s": reference_s, "wall_s": wall,
            "peak_rss_mb": peak_rss_mb(), "final_loss": steps_[-1]["loss/dpo"]}


def child_trl(data: str, model_dir: str, steps: int, precision: str,
              max_grad_norm: float) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Timed(DPOTrainer):
        """Counts the non-padding tokens of every batch the trainer computes a loss on."""
        tokens = 0

        def compute_loss(self, model, inputs, *args, **kwargs):
            Timed.tokens += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.tokens, self.losses, self._t, self._n = [], [], [], 0.0, 0

        def on_step_begin(self, args, state, control, **kw):
            self._t, self._n = time.perf_counter(), Timed.tokens

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self._t)
            self.tokens.append(Timed.tokens - self._n)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    train = datasets.load_dataset("json", data_files=data, split="train")
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="dpo-bench-trl-"), max_steps=steps,
                     per_device_train_batch_size=PAIRS_PER_STEP, gradient_accumulation_steps=1,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, max_grad_norm=max_grad_norm, beta=BETA, loss_type=["sigmoid"], max_length=1024,
                     use_cpu=True, bf16=precision == "bf16", fp16=False, logging_steps=1,
                     save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0, disable_tqdm=True)
    timer = StepTimer()
    trainer = Timed(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                    callbacks=[timer])
    trainer.train()
    wall = time.perf_counter() - t0
    shutil.rmtree(args.output_dir, ignore_errors=True)
    rate = steady_rate(timer.tokens, timer.seconds)
    return {"tokens_per_s": rate, "steps": len(timer.seconds),
            "step_s": sum(timer.seconds) / len(timer.seconds),
            "tokens_per_step": sum(timer.tokens) / len(timer.tokens), "reference_s": None,
            "wall_s": wall, "peak_rss_mb": peak_rss_mb(),
            "final_loss": timer.losses[-1] if timer.losses else None}


# ------------------------------------------------------------------------------ parent


def run_child(python: str, name: str, data: str, model_dir: str, steps: int, threads: int,
              precision: str, max_grad_norm: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "TETHER_CACHE": os.environ.get("TETHER_CACHE", str(Path.home() / ".cache/tether"))}
    if name == "trl-alloc":  # TRL under the glibc thresholds tether sets for itself
        from tether.engine.dist import HOST_MMAP_THRESHOLD, HOST_TRIM_THRESHOLD
        env.update(MALLOC_MMAP_THRESHOLD_=str(HOST_MMAP_THRESHOLD),
                   MALLOC_TRIM_THRESHOLD_=str(HOST_TRIM_THRESHOLD))
    cmd = [python, __file__, "--child", name, "--data", data, "--model-dir", model_dir,
           "--steps", str(steps), "--threads", str(threads), "--precision", precision,
           "--max-grad-norm", str(max_grad_norm)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trl-python", help="python of a venv with trl installed")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=115, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="both trainers: bf16 autocast over fp32 weights (both trainers' "
                             "default on a CPU with native bf16), or fp32")
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="both trainers' gradient clipping (0: none; tether then steps each "
                             "parameter in backward, as soon as its gradient is complete)")
    parser.add_argument("--only", choices=CHILDREN, help="run one trainer only")
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        child = {"tether": child_tether, "tether-gc": partial(child_tether, checkpointing=True),
                 "tether-pad0": partial(child_tether, pad_to_multiple_of=0),
                 "trl": child_trl, "trl-alloc": child_trl}[args.child]
        result = child(args.data, args.model_dir, args.steps, args.precision,
                       args.max_grad_norm)
        print(json.dumps(result))
        return
    if args.only in (None, "trl", "trl-alloc") and not args.trl_python:
        parser.error("--trl-python is required (or --only tether); see the docstring for setup")
    work = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    data = work / "pairs.jsonl"
    model_dir, mean_tokens = build_data(data, args.steps * PAIRS_PER_STEP, args.tokens)
    print(f"{args.steps * PAIRS_PER_STEP} pairs, {mean_tokens / 2:.1f} tokens per sequence "
          f"(tether's tokenisation), {args.threads} threads, model {model_dir}", flush=True)
    results = {}
    for name, python in (("tether", sys.executable), ("tether-gc", sys.executable),
                         ("tether-pad0", sys.executable), ("trl", args.trl_python),
                         ("trl-alloc", args.trl_python)):
        if args.only in (None, name):
            results[name] = run_child(python, name, str(data), model_dir, args.steps,
                                      args.threads, args.precision, args.max_grad_norm)
            r = results[name]
            incl = r["tokens_per_step"] * r["steps"] / (r["step_s"] * r["steps"] +
                                                        (r["reference_s"] or 0.0))
            r["tokens_per_s_incl_reference"] = incl
            print(f"{name:>10}: {r['tokens_per_s']:8.1f} tokens/s (steady), {incl:8.1f} incl. "
                  f"reference pass, {r['step_s']:.2f} s/step, wall {r['wall_s']:.0f} s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MiB, final loss {r['final_loss']}", flush=True)
    for name in ("tether", "tether-gc", "tether-pad0"):
        for base in ("trl", "trl-alloc"):
            if name in results and base in results:
                t, r = results[name], results[base]
                print(f"{name} / {base}: {t['tokens_per_s'] / r['tokens_per_s']:.2f}x tokens/s "
                      f"(target >= 2.5x), {t['peak_rss_mb'] / r['peak_rss_mb']:.2f}x peak RSS "
                      "(target <= 0.7x)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
