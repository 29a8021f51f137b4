"""The six labelled sets of `../shared/data`, in the order every benchmark table lists them.

One place for the scripts that evaluate "all six sets" (bench_universal.py, the probes); the
leave-one-out folds group them differently (bench_loo.py, FOLDS).
"""

DATASETS = ("busi", "ddti", "tg3k", "carotid", "usgra_nerve", "usgra_vessel")
