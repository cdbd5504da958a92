"""r1kit: the DeepSeek-R1 training system end to end (GRPO, rule rewards, R1-Zero, R1, distillation)."""

__version__ = "0.1.0"
