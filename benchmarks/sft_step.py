"""SFT step speed and memory on the default model (run by hand; results in README.md here).

    .venv/bin/python benchmarks/sft_step.py --precision fp32 bf16 --steps 4

Each precision runs in a fresh subprocess (so peak RSS is its own): default model, built-in
arithmetic rows, batch 8 in micro-batches of 4, full fine-tune. Reports tokens/s (non-padding
tokens, forward + backward + optimizer) averaged over the steps after the first, and peak RSS.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile


def child(precision: str, steps: int) -> None:
    from tether.config import SFTConfig, load_config
    from tether.recipes import sft

    out = tempfile.mkdtemp()
    cfg = load_config(SFTConfig, None, [f"--train.precision={precision}",
                                        f"--train.max_steps={steps}", f"--run.output_dir={out}",
                                        "--run.eval_generations=0", "--run.progress=false",
                                        "--run.tensorboard=false", "--data.eval_fraction=0.02"])
    sft.run(cfg)
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    shutil.rmtree(out)  # its final checkpoint (weights and AdamW moments) is 1.5 GB
    steps_ = [r for r in rows if "loss/sft" in r][1:]  # skip the warm-up step
    print(json.dumps({"precision": precision,
                      "tokens_per_s": sum(r["tokens/per_second"] for r in steps_) / len(steps_),
                      "s_per_step": sum(r["time/step"] for r in steps_) / len(steps_),
                      "peak_rss_mb": max(r["memory/peak_mb"] for r in rows if "memory/peak_mb" in r)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps)
    for precision in args.precision:
        out = subprocess.run([sys.executable, __file__, "--child", precision, "--steps",
                              str(args.steps)], capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
