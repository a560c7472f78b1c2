"""k-reciprocal re-ranking (rerank.py) against a direct implementation of the paper, and its time at
SYSU-MM01 multi-shot size."""
import functools
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rerank import k_reciprocal_distance


def paper_rerank(query, gallery, k1, k2, lambda_value, expansions=None):
    """Re-ranking written directly from the paper's equations, one image and one pair at a time, in
    float64, with the choices of the authors' code that rerank.py documents (row-scaled squared
    Euclidean d, N(p, k) = the k + 1 nearest with p first, strictly more than 2/3, V rows summing to 1).
    expansions: a list that gets one entry per R(q, k1/2) joined into an R*."""
    features = np.concatenate([query, gallery]).astype(np.float64)
    count, num_query = len(features), len(query)
    d = np.array([[np.sum((a - b) ** 2) for b in features] for a in features])
    d = d / d.max(axis=1, keepdims=True)
    ranking = [sorted(range(count), key=lambda g: d[p, g]) for p in range(count)]

    def nearest(p, k):  # N(p, k)
        return set(ranking[p][:k + 1])

    @functools.lru_cache(maxsize=None)
    def reciprocal(p, k):  # R(p, k)
        return frozenset(g for g in nearest(p, k) if p in nearest(g, k))

    def expanded(p):  # R*(p, k1)
        members = set(reciprocal(p, k1))
        for q in reciprocal(p, k1):
            half = reciprocal(q, round(k1 / 2))
            if len(half & reciprocal(p, k1)) > 2 / 3 * len(half):
                members |= half
                if expansions is not None:
                    expansions.append((p, q))
        return members

    V = np.zeros((count, count))
    for p in range(count):
        for g in expanded(p):
            V[p, g] = np.exp(-d[p, g])  # Gaussian kernel of the distance
        V[p] /= V[p].sum()
    if k2 > 1:  # local query expansion over N(p, k2)
        V = np.array([np.mean([V[q] for q in ranking[p][:k2]], axis=0) for p in range(count)])

    final = np.zeros((num_query, len(gallery)))
    for p in range(num_query):
        for j in range(len(gallery)):
            g = num_query + j
            jaccard = 1 - np.minimum(V[p], V[g]).sum() / np.maximum(V[p], V[g]).sum()
            final[p, j] = (1 - lambda_value) * jaccard + lambda_value * d[p, g]
    return final


def clustered_features(seed, num_query, num_gallery, num_ids=8, dim=16):
    """L2-normalised features around one centre per identity, so that neighbourhoods are structured."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    features = centres[rng.integers(0, num_ids, num_query + num_gallery)] + 0.6 * rng.normal(size=(num_query + num_gallery, dim))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features[:num_query], features[num_query:]


@pytest.mark.parametrize('seed, k1, k2, lambda_value', [(0, 20, 6, 0.3), (1, 6, 3, 0.5), (2, 5, 1, 0.0), (3, 9, 4, 1.0)])
def test_rerank_equals_a_direct_implementation_of_the_paper(seed, k1, k2, lambda_value):
    query, gallery = clustered_features(seed, 30, 45)
    expansions = []
    expected = paper_rerank(query, gallery, k1, k2, lambda_value, expansions)
    assert expansions  # the R* rule really adds sets in this case
    np.testing.assert_allclose(k_reciprocal_distance(query, gallery, k1, k2, lambda_value), expected, atol=1e-10)
    fast32 = k_reciprocal_distance(query.astype(np.float32), gallery.astype(np.float32), k1, k2, lambda_value)
    assert fast32.dtype == np.float32 and fast32.shape == (30, 45)
    np.testing.assert_allclose(fast32, expected, atol=2e-5)
    on_tensors = k_reciprocal_distance(torch.from_numpy(query), torch.from_numpy(gallery), k1, k2, lambda_value,
                                       device=torch.device('cpu'))
    np.testing.assert_allclose(on_tensors, expected, atol=1e-10)


def test_rerank_with_lambda_one_ranks_like_the_cosine_distance():
    query, gallery = clustered_features(4, 20, 50)
    reranked = k_reciprocal_distance(query, gallery, lambda_value=1.0)
    assert np.array_equal(np.argsort(reranked, axis=1), np.argsort(-query @ gallery.T, axis=1))


def test_rerank_time_at_sysu_multishot_size():
    """Prints the time of a random case of SYSU-MM01 multi-shot size (3,803 queries, 3,840 gallery
    images, 2,048-d features, the AGW ResNet-50 size); no timed assertion."""
    generator = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(3803, 2048, generator=generator), dim=1)
    gallery = F.normalize(torch.randn(3840, 2048, generator=generator), dim=1)
    start = time.perf_counter()
    distances = k_reciprocal_distance(query, gallery)
    elapsed = time.perf_counter() - start
    assert distances.shape == (3803, 3840) and np.isfinite(distances).all()
    print(f'\nk-reciprocal re-ranking, 3,803 x 3,840, 2,048-d, {torch.get_num_threads()} CPU thread(s): {elapsed:.1f} s')
