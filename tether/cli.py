"""`tether <recipe> [CONFIG.yaml] [--section.key=value ...]`, and `tether export RUN_DIR OUT_DIR`.

Exit status: 0 done; 2 a mistake the user can fix (bad config key or value, malformed row,
missing or unreadable file): one line naming what to fix, no traceback; 3 the training stopped at
a NaN/inf loss or gradient (one line naming the step and the micro-batch; no checkpoint is
written for that step); 130 Ctrl-C: a training loop saves its step first and names the
checkpoint (docs/cli.md, "Failure and resume"); 1 anything else (a bug: the traceback).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tether.errors import Interrupted, TetherError


@dataclass
class Recipe:
    summary: str
    config: Callable[[], type]
    run: Callable[[], Callable]
    variants: Callable[[], list[str]] | None = None  # its registry's names, read when shown

    def describe(self) -> str:
        return self.summary if self.variants is None else \
            f"{self.summary}: {', '.join(self.variants())}"


def _preference_losses() -> list[str]:
    from tether.config import preference_loss_names

    return preference_loss_names()


def _grpo_variants() -> list[str]:
    from tether.config import grpo_variant_names

    return grpo_variant_names()


def _sft_config():
    from tether.config import SFTConfig

    return SFTConfig


def _sft_run():
    from tether.recipes.sft import run

    return run


def _dpo_config():
    from tether.config import DPOConfig

    return DPOConfig


def _dpo_run():
    from tether.recipes.dpo import run

    return run


def _rm_config():
    from tether.config import RMConfig

    return RMConfig


def _rm_run():
    from tether.recipes.rm import run

    return run


def _prm_config():
    from tether.config import PRMConfig

    return PRMConfig


def _prm_run():
    from tether.recipes.prm import run

    return run


def _ppo_config():
    from tether.config import PPOConfig

    return PPOConfig


def _ppo_run():
    from tether.recipes.ppo import run

    return run


def _rlhf_config():
    from tether.config import RLHFConfig

    return RLHFConfig


def _rlhf_run():
    from tether.recipes.rlhf import run

    return run


def _cai_config():
    from tether.config import CAIConfig

    return CAIConfig


def _cai_run():
    from tether.recipes.cai import run

    return run


def _grpo_config():
    from tether.config import GRPOConfig

    return GRPOConfig


def _grpo_run():
    from tether.recipes.grpo import run

    return run


def _compare_config():
    from tether.config import CompareConfig

    return CompareConfig


def _compare_run():
    from tether.recipes.compare import run

    return run


def _prefs_config():
    from tether.config import PrefsConfig

    return PrefsConfig


def _prefs_run():
    from tether.recipes.prefs import run

    return run


def _label_config():
    from tether.config import LabelConfig

    return LabelConfig


def _label_run():
    from tether.recipes.label import run

    return run


def _goodhart_config():
    from tether.config import GoodhartConfig

    return GoodhartConfig


def _goodhart_run():
    from tether.recipes.goodhart import run

    return run


RECIPES: dict[str, Recipe] = {
    "sft": Recipe("supervised fine-tuning on demonstrations (prompt-completion, messages, text)",
                  _sft_config, _sft_run),
    "dpo": Recipe("direct preference optimisation", _dpo_config, _dpo_run, _preference_losses),
    "prefs": Recipe("build a preference set: sample a model, order each pair by a gold reward",
                    _prefs_config, _prefs_run),
    "label": Recipe("label preference pairs with a local AI judge (RLAIF): labels.jsonl, soft p",
                    _label_config, _label_run),
    "rm": Recipe("reward model: Bradley-Terry on preference pairs (one score per sequence)",
                 _rm_config, _rm_run),
    "prm": Recipe("process reward model: a score for every step of a solution (stepwise rows)",
                  _prm_config, _prm_run),
    "ppo": Recipe("RLHF-PPO: policy, critic, frozen reference, reward model or functions",
                  _ppo_config, _ppo_run),
    "rlhf": Recipe("the three stages in one command: sft -> rm -> ppo, each resumable",
                   _rlhf_config, _rlhf_run),
    "cai": Recipe("Constitutional AI: critique -> revision -> SFT, then judge-labelled pairs -> "
                  "DPO (or RM -> PPO), then tether eval; each stage resumable",
                  _cai_config, _cai_run),
    "grpo": Recipe("group-relative RL with reward functions", _grpo_config, _grpo_run,
                   _grpo_variants),
    "goodhart": Recipe("reward-model over-optimisation: best-of-n and GRPO vs a small proxy RM, "
                       "gold and proxy over sqrt(KL), fits",
                       _goodhart_config, _goodhart_run),
    "compare": Recipe("DPO (beta sweep), PPO-RLHF, GRPO and best-of-n from one policy on the "
                      "sentiment task, each evaluated: table + gold-vs-KL plot",
                      _compare_config, _compare_run),
}

USAGE = """usage: tether <command> [CONFIG.yaml] [--section.key=value ...]

Post-training for language models. Runs on one CPU with the default model
(SmolLM2-135M-Instruct, no download) and scales out with torchrun + FSDP2.

recipes:
{recipes}

other commands:
  eval MODEL_OR_RUN [CONFIG.yaml] [--task sentiment|arithmetic|PATH.jsonl] [--reference MODEL]
                           sample held-out prompts with the model and its reference: gold and
                           proxy reward, KL (k1, k3), entropy, distinct-n, self-BLEU, length,
                           alignment tax; writes eval.json (RUN_DIR/eval.json for a run)
  export RUN_DIR OUT_DIR [--force]
                           write a run's latest weights as a plain HF model directory
                           (LoRA adapters merged) that from_pretrained loads; an existing
                           non-empty OUT_DIR only with --force (replaces export's files only)
  keys RECIPE              list every config key of a recipe with its default
  report RUN_DIR [--out FILE]
                           one self-contained HTML file of a run: curves, warnings, the
                           eval table and samples before vs after (RUN_DIR/report.html)

examples:
  tether sft                                   # built-in data, default model
  tether sft my.yaml --train.lr=1e-5 --data.path=rows.jsonl
  torchrun --nproc_per_node 2 -m tether sft --train.batch_size=8
  tether export runs/sft runs/sft-model
  tether eval runs/dpo --task sentiment        # the DPO run against the model it started from

Config keys and data formats: docs/config.md, docs/data.md. Metrics: docs/metrics.md.
"""


def usage() -> str:
    width = max(len(n) for n in RECIPES)
    lines = [f"  {name.ljust(width)}  {r.describe()}" for name, r in RECIPES.items()]
    return USAGE.format(recipes="\n".join(lines))


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """(CONFIG.yaml or None, overrides). Accepts `--key=value` and `--key value`."""
    config_path, overrides, i = None, [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--"):
                arg, i = f"{arg}={args[i + 1]}", i + 1
            overrides.append(arg)
        elif config_path is None:
            config_path = arg
        else:
            raise TetherError(f"unexpected argument '{arg}' (only one CONFIG.yaml is taken)")
        i += 1
    return config_path, overrides


def cmd_recipe(name: str, args: list[str]) -> int:
    from tether.config import load_config

    recipe = RECIPES[name]
    config_path, overrides = split_args(args)
    cfg = load_config(recipe.config(), config_path, overrides)
    recipe.run()(cfg)
    return 0


def cmd_keys(args: list[str]) -> int:
    from tether.config import key_choices, valid_keys

    if len(args) != 1 or args[0] not in RECIPES:
        raise TetherError(f"usage: tether keys RECIPE (one of {', '.join(RECIPES)})")
    cfg = RECIPES[args[0]].config()()
    choices = key_choices(type(cfg))
    for key in valid_keys(type(cfg)):
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        names = f"  # one of {', '.join(choices[key])}" if key in choices else ""
        print(f"{key} = {value!r}{names}")
    return 0


def cmd_export(args: list[str]) -> int:
    paths = [a for a in args if a != "--force"]
    unknown = [a for a in paths if a.startswith("--")]
    if unknown or len(paths) != 2:
        raise TetherError(f"{f'unknown option {unknown[0]!r}; ' if unknown else ''}"
                          "usage: tether export RUN_DIR OUT_DIR [--force]")
    from tether.engine.checkpoint import export_run

    out = export_run(Path(paths[0]), Path(paths[1]), force="--force" in args)
    print(f"exported to {out}")
    return 0


def cmd_eval(args: list[str]) -> int:
    """`tether eval MODEL_OR_RUN [CONFIG.yaml] [--key=value ...]`: the keys of EvalConfig."""
    from tether.config import EvalConfig, load_config

    models = [a for a in args if not a.startswith("--") and not a.endswith((".yaml", ".yml"))
              and not _is_option_value(args, a)]
    if len(models) != 1:
        raise TetherError("usage: tether eval MODEL_OR_RUN [CONFIG.yaml] [--task=...] "
                          "[--reference=MODEL] [--key=value ...] (docs/diagnostics.md)")
    config_path, overrides = split_args([a for a in args if a is not models[0]])
    cfg = load_config(EvalConfig, config_path, [*overrides, f"--model={models[0]}"])
    from tether.eval.evaluate import run

    report = run(cfg)
    run_dir = Path(report["path"]).parent
    if (run_dir / "metrics.jsonl").is_file():  # a run: its report now holds the eval table
        from tether.eval.report import write_report

        print(f"report: {write_report(run_dir)}")
    return 0


def _is_option_value(args: list[str], arg: str) -> bool:
    """`arg` is the value of a preceding `--key value` option."""
    i = args.index(arg)
    return i > 0 and args[i - 1].startswith("--") and "=" not in args[i - 1]


def cmd_report(args: list[str]) -> int:
    usage_line = "usage: tether report RUN_DIR [--out FILE]"
    run_dirs, out, rest = [], None, list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--out" and rest:
            out = rest.pop(0)
        elif arg.startswith("--out="):
            out = arg.partition("=")[2]
        elif arg.startswith("-"):
            raise TetherError(f"unknown option '{arg}'; {usage_line}")
        else:
            run_dirs.append(arg)
    if len(run_dirs) != 1 or out == "":
        raise TetherError(usage_line)
    from tether.eval.report import write_report

    path = write_report(Path(run_dirs[0]), Path(out) if out else None)
    print(f"report written to {path}")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "eval": cmd_eval, "export": cmd_export, "keys": cmd_keys, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if any(a in ("-h", "--help") for a in rest) and command in RECIPES:
        print(f"tether {command}: {RECIPES[command].describe()}\n"
              f"keys: `tether keys {command}`; see docs/config.md")
        return 0
    try:
        if command in RECIPES:
            return cmd_recipe(command, rest)
        if command in COMMANDS:
            return COMMANDS[command](rest)
        import difflib

        near = difflib.get_close_matches(command, [*RECIPES, *COMMANDS], n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise TetherError(f"unknown command '{command}'{hint} (see `tether --help`)")
    except Interrupted as err:
        print(f"tether: {err}", file=sys.stderr)
        return 130
    except TetherError as err:
        print(f"tether: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a NaN/inf loss or gradient (engine/optimize.py)
        print(f"tether: error: {err}", file=sys.stderr)
        return 3
    except OSError as err:  # a path that cannot be read or written (a file where a directory
        # must go, no permission, disk full): name the path
        what = f"{err.filename}: " if err.filename else ""
        print(f"tether: error: {what}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tether: interrupted", file=sys.stderr)
        return 130
    finally:  # the vLLM engines (or server processes) evaluations shared; none unless the
        # backend module was imported, so a command that never sampled imports nothing here
        backends = sys.modules.get("tether.engine.backends")
        if backends is not None:
            backends.close_shared()


def entry() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    entry()
