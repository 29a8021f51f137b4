"""Benchmarks run from the command line (`uniultra bench ...`); results land in benchmarks/results/."""
