"""tether: post-training for language models (SFT, reward models, PPO-RLHF, DPO family, GRPO)."""

__version__ = "0.1.0"
