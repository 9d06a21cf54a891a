"""
Which SAE latents fire together (the official 3_lora_sae/clustering/ groups latents by
co-activation): the Jaccard index of every pair over the store's tokens, J(i, j) = |i and j fire| /
|i or j fires|, and the clusters it implies.

    from coactivation import cofiring, jaccard, clusters
    counts, both = cofiring(store, sae)           # per latent, per pair: tokens where they fire
    groups = clusters(jaccard(counts, both), threshold=0.5, min_size=2)

cofiring takes one pass over the store: the firing pattern of a shard is a (tokens, latents)
0/1 matrix B, and B^T B adds every pair's count of tokens where both fire (a dense product: 10M
tokens x 3,584^2 latents is 1.3e14 multiply-adds, about a minute on one GPU, --device cuda).
Clusters are the connected components of the graph that links two latents whose Jaccard index
is at least the threshold (single linkage cut at that height): latents that always fire together
land in one cluster, whatever the rest does. Latents that fire on fewer than MIN_FIRING tokens are
left out of pairs and clusters (the official script's cut: two latents that fire once, together,
have J = 1 and say nothing).
"""
import numpy as np
import torch

MIN_FIRING = 16  # tokens a latent must fire on to enter pairs and clusters


def cofiring(store, sae, device="cpu", chunk=65536):
    """(counts (F,), both (F, F)): tokens where each latent fires, and where each pair does."""
    F = sae.n_latents
    counts = torch.zeros(F, dtype=torch.float64)
    both = torch.zeros(F, F, dtype=torch.float64, device=device)
    sae = sae.to(device)
    with torch.no_grad():
        for i in range(len(store.index["shards"])):
            x = np.array(store.shard(i), dtype=np.float32)  # a copy: the shard is read-only
            for s in range(0, len(x), chunk):
                b = (sae.encode(torch.from_numpy(x[s:s + chunk]).to(device)) > 0).float()
                counts += b.sum(0).double().cpu()
                both += (b.T @ b).double()  # counts up to 2^24 per chunk are exact in fp32
    return counts.numpy(), both.cpu().numpy()


def frequent_only(J, counts, min_firing=MIN_FIRING):
    """J with the rows and columns of latents that fire on fewer than min_firing tokens zeroed."""
    rare = counts < min_firing
    J = J.copy()
    J[rare, :] = 0
    J[:, rare] = 0
    return J


def jaccard(counts, both):
    """J (F, F) from cofiring's counts: |i and j| / (|i| + |j| - |i and j|); 0 where neither
    fires (and 1 on the diagonal of a latent that fires)."""
    union = counts[:, None] + counts[None, :] - both
    return np.divide(both, union, out=np.zeros_like(both, dtype=np.float64), where=union > 0)


def clusters(J, threshold=0.5, min_size=2):
    """Connected components of {(i, j): J[i, j] >= threshold, i != j} with at least min_size
    latents, largest first (ties: by smallest latent): [[latent, ...], ...], each sorted."""
    F = len(J)
    parent = list(range(F))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, j in zip(*np.nonzero(np.triu(J >= threshold, k=1))):
        ri, rj = root(int(i)), root(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups = {}
    for i in range(F):
        groups.setdefault(root(i), []).append(i)
    out = [g for g in groups.values() if len(g) >= min_size]
    return sorted(out, key=lambda g: (-len(g), g[0]))
