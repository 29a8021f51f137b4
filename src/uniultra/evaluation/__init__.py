"""Evaluation: metrics, trivial baselines and the `uniultra evaluate` command."""
