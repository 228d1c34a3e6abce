"""`refusalkit abliterate`: search ablation kernels, keep the Pareto front of judged refusals
against KL, and save the chosen trial as a standalone Hugging Face checkpoint."""

from refusalkit.abliterate.config import AbliterateConfig
from refusalkit.abliterate.pipeline import run_abliterate
from refusalkit.abliterate.reproduce import reproduce

__all__ = ["AbliterateConfig", "reproduce", "run_abliterate"]
