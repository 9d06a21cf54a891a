"""Timing helpers shared by the benchmarks: interleaved runs, medians, one printed line per figure."""
import statistics
import time

import torch


def timeit(fn, sync=None):
    if sync:
        sync()
    t = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t


def interleaved(fns, repeats, warmup=1, sync=None):
    """Run each fn in turn `repeats` times (after `warmup` rounds); return {name: median seconds}.

    Interleaving spreads machine noise evenly over the contenders, so ratios are fair even when
    absolute times drift.
    """
    for _ in range(warmup):
        for fn in fns.values():
            timeit(fn, sync)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timeit(fn, sync))
    return {k: statistics.median(v) for k, v in times.items()}


def header(title):
    print(f"# {title} | torch {torch.__version__} | threads {torch.get_num_threads()}")
