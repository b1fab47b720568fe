"""AIS-RL: adaptive importance sampling for low-precision rollouts in GRPO."""
