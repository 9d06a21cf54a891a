"""
The activation state's shape: how many directions the adapter scalars really use (the official
misc_experiments/ look at the SVD of the state). One pass over the activation store
accumulates the mean and the second moment in float64, so a 10M-token store (18 GB) never sits in
memory; the covariance's eigenvalues are the squared singular values of the centred state / N.

    from state_shape import state_spectrum
    s = state_spectrum(ActivationStore("acts/"))     # the official: 192 MLP scalars, 100k tokens
    s = state_spectrum(store, "all", max_tokens=0)   # the whole state
    s["effective_rank"], s["components_for"]["0.9"]

By default the official analysis's input: the 192 MLP scalars (gate, up, down of every layer)
over the store's first 100,000 tokens (scalars="mlp", max_tokens=100_000); scalars="all" and
max_tokens=0 read the whole state (every adapter, every token).

Reported: the variance of each principal direction (descending) and its cumulative share; the
number of directions for 50/90/99% of the variance; two effective ranks, the participation ratio
(sum l)^2 / sum l^2 and exp(entropy) of the normalised variances (Roy and Vetterli's). Both are d
for an isotropic state and 1 for a state on one line. The scalars are taken raw (not divided by
their std): their scales are part of what the adapter does.
"""
import numpy as np

SHARES = (0.5, 0.9, 0.99)


MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def columns(store, scalars):
    """The store's columns of the chosen scalars: "mlp" (the MLP adapters') or "all"."""
    if scalars not in ("mlp", "all"):
        raise ValueError(f"scalars {scalars!r}: expected mlp or all")
    rank = store.index.get("rank", 1)
    return [j * rank + r for j, (_, t) in enumerate(store.index["sites"]) for r in range(rank)
            if scalars == "all" or t in MLP_TARGETS]


def moments(store, cols=None, max_tokens=0):
    """(N, mean, second moment) of the store's rows (its first max_tokens, 0: all; columns cols,
    None: all), float64, one shard at a time."""
    d = len(cols) if cols is not None else store.index["shape"][1]
    n, s1, s2 = 0, np.zeros(d), np.zeros((d, d))
    for i in range(len(store.index["shards"])):
        if max_tokens and n >= max_tokens:
            break
        x = np.asarray(store.shard(i), dtype=np.float64)
        x = x[:, cols] if cols is not None else x
        x = x[:max_tokens - n] if max_tokens else x
        n += len(x)
        s1 += x.sum(0)
        s2 += x.T @ x
    if n == 0:
        raise ValueError(f"{store.path}: the store holds no tokens")
    return n, s1 / n, s2 / n


def spectrum(variances):
    """The figures of a descending variance spectrum (eigenvalues of the covariance)."""
    lam = np.clip(np.asarray(variances, dtype=np.float64), 0, None)
    total = lam.sum()
    if total <= 0:
        raise ValueError("the state has no variance (every token the same)")
    p = lam / total
    cum = np.cumsum(p)
    nz = p[p > 0]
    return dict(variances=lam.tolist(), cumulative=cum.tolist(), total_variance=float(total),
                components_for={str(s): int(np.searchsorted(cum, s - 1e-12) + 1) for s in SHARES},
                participation_ratio=float(total ** 2 / (lam ** 2).sum()),
                effective_rank=float(np.exp(-(nz * np.log(nz)).sum())), dims=len(lam))


def state_spectrum(store, scalars="mlp", max_tokens=100_000):
    """spectrum() of the store's centred state (see the module docstring for the defaults), with
    its token count and what it read."""
    n, mean, second = moments(store, columns(store, scalars), max_tokens)
    cov = second - np.outer(mean, mean)
    lam = np.linalg.eigvalsh((cov + cov.T) / 2)[::-1]
    return dict(spectrum(lam), tokens=n, scalars=scalars, max_tokens=max_tokens)
