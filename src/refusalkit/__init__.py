"""refusalkit — measure, explain and control refusal in open-weight language models."""

__version__ = "0.1.0"
