"""Cross-modality re-identification metrics: CMC, mAP and mINP.

The numbers follow the evaluation protocol used by the public AGW baseline
(and hence by the published SYSU-MM01 / RegDB results), re-implemented here
with array operations on the whole (num_q, num_g) matrix instead of a Python
loop over queries:

* SYSU-MM01: a query from camera 3 ignores gallery images from camera 2.
  CMC is computed on each query's ranked list of gallery *identities* with
  repeats removed (first occurrence kept); mAP and mINP use the raw ranked
  list after the camera rule.
* RegDB: no camera rule and no identity de-duplication.

Only queries with at least one true match left in their ranked list are
"valid"; CMC, mAP and mINP are averaged over the valid queries.

The end of the module runs the whole test protocol of each dataset around a feature extractor that
the calling script supplies: the query and gallery sets and the gallery trials, with their features,
make a RetrievalSet, which ranks by a distance (the public -q.g unless another is given: re-ranking)
and scores each trial.

Importing this module has no side effects.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from data_manager import process_gallery_sysu, process_query_sysu, process_test_regdb

__all__ = ['eval_sysu', 'eval_regdb', 'summarize', 'inner_product_distance', 'RetrievalSet', 'sysu_retrieval_set',
           'regdb_retrieval_set', 'average_results']

# Below this many distance entries a single-threaded argsort is already fast.
_PARALLEL_MIN_ENTRIES = 1 << 20


def eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    """SYSU-MM01 metrics.

    Args:
        distmat: (num_q, num_g) array, smaller is closer.
        q_pids: (num_q,) query identities.  g_pids: (num_g,) gallery identities.
        q_camids: (num_q,) query cameras.  g_camids: (num_g,) gallery cameras.
        max_rank: length of the CMC curve, clipped to num_g.

    Returns:
        cmc: (min(max_rank, num_g),) float64, cmc[0] is Rank-1 (identity
            de-duplicated ranked list).
        mAP: float in [0, 1].  mINP: float in [0, 1].

    Raises:
        ValueError: no query has a true match in the gallery.
    """
    q_camids = _as_1d(q_camids, 'q_camids')
    g_camids = _as_1d(g_camids, 'g_camids')
    distmat = np.asarray(distmat)
    if distmat.ndim != 2 or q_camids.shape[0] != distmat.shape[0] or g_camids.shape[0] != distmat.shape[1]:
        raise ValueError('distmat must be (num_q, num_g) and q_camids/g_camids of length num_q/num_g; '
                         'got {}, {} and {}.'.format(distmat.shape, q_camids.shape, g_camids.shape))
    q_drop, g_drop = _sysu_skip_rule(q_camids, g_camids)
    return _evaluate(distmat, q_pids, g_pids, max_rank, q_drop=q_drop, g_drop=g_drop, dedup=True)


def eval_regdb(distmat, q_pids, g_pids, max_rank=20):
    """RegDB metrics (no camera rule, no identity de-duplication).

    Args:
        distmat: (num_q, num_g) array, smaller is closer.
        q_pids: (num_q,) query identities.  g_pids: (num_g,) gallery identities.
        max_rank: length of the CMC curve, clipped to num_g.

    Returns:
        cmc: (min(max_rank, num_g),) float64, cmc[0] is Rank-1.
        mAP: float in [0, 1].  mINP: float in [0, 1].

    Raises:
        ValueError: no query has a true match in the gallery.
    """
    return _evaluate(np.asarray(distmat), q_pids, g_pids, max_rank,
                     q_drop=None, g_drop=None, dedup=False)


def summarize(cmc, mAP, mINP):
    """One-line summary, e.g. 'Rank-1: 12.34% | Rank-5: ... | mAP: ... | mINP: ...'.

    cmc: (R,) CMC curve; Rank-1/5/10/20 entries beyond R are omitted.
    """
    parts = ['Rank-{}: {:.2f}%'.format(r, 100.0 * float(cmc[r - 1]))
             for r in (1, 5, 10, 20) if r <= len(cmc)]
    parts.append('mAP: {:.2f}%'.format(100.0 * float(mAP)))
    parts.append('mINP: {:.2f}%'.format(100.0 * float(mINP)))
    return ' | '.join(parts)


def _sysu_skip_rule(q_camids, g_camids):
    """The camera rule of the SYSU-MM01 protocol: a camera-3 query skips camera-2 gallery images.
    Returns (q_drop (num_q,) bool, g_drop (num_g,) bool): gallery entry g is skipped for query q
    when q_drop[q] and g_drop[g]."""
    return np.asarray(q_camids) == 3, np.asarray(g_camids) == 2


def _sysu_skipped(q_camids, g_camids):
    """(num_q, num_g) bool: the gallery entries the SYSU-MM01 camera rule skips for each query."""
    q_drop, g_drop = _sysu_skip_rule(q_camids, g_camids)
    return q_drop[:, None] & g_drop[None, :]


def _as_1d(a, name):
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError('{} must be one-dimensional, got shape {}.'.format(name, a.shape))
    return a


def _argsort_rows(distmat):
    """(num_q, num_g) -> (num_q, num_g) intp, identical to np.argsort(distmat, axis=1).

    Sorting is the dominant cost; each row is sorted independently with the
    default sort kind, so sorting row blocks in threads (numpy releases the
    GIL while sorting) gives exactly the same order, ties included.
    """
    try:
        n_cpu = len(os.sched_getaffinity(0))
    except AttributeError:  # not available on every platform
        n_cpu = os.cpu_count() or 1
    num_q = distmat.shape[0]
    if n_cpu < 2 or distmat.size < _PARALLEL_MIN_ENTRIES or num_q < 2:
        return np.argsort(distmat, axis=1)
    distmat = np.ascontiguousarray(distmat)
    order = np.empty(distmat.shape, dtype=np.intp)
    n_workers = min(n_cpu, 8)
    # A few more blocks than workers evens out uneven scheduling.
    bounds = np.linspace(0, num_q, min(num_q, 4 * n_workers) + 1).astype(int)

    def sort_block(i):
        lo, hi = bounds[i], bounds[i + 1]
        order[lo:hi] = np.argsort(distmat[lo:hi], axis=1)

    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        list(pool.map(sort_block, range(len(bounds) - 1)))
    return order


def _evaluate(distmat, q_pids, g_pids, max_rank, q_drop, g_drop, dedup):
    """Shared implementation.

    q_drop: (num_q,) bool or None, g_drop: (num_g,) bool or None: gallery
    entry g is skipped for query q when q_drop[q] and g_drop[g].
    dedup: compute CMC on the identity list with repeats removed.
    """
    q_pids = _as_1d(q_pids, 'q_pids')
    g_pids = _as_1d(g_pids, 'g_pids')
    if distmat.ndim != 2 or distmat.shape != (q_pids.shape[0], g_pids.shape[0]):
        raise ValueError('distmat must have shape (len(q_pids), len(g_pids)) = ({}, {}), got {}.'.format(
            q_pids.shape[0], g_pids.shape[0], distmat.shape))
    num_q, num_g = distmat.shape
    if num_q == 0 or num_g == 0:
        raise ValueError('Cannot evaluate: no query has a true match in the gallery '
                         '(got {} queries and {} gallery images).'.format(num_q, num_g))
    max_rank = min(int(max_rank), num_g)
    if max_rank < 1:
        raise ValueError('max_rank must be at least 1, got {}.'.format(max_rank))

    # Relabel identities as 0..P-1 (gallery) so the per-entry arrays are small
    # int32; a query identity absent from the gallery gets -1 (never matches).
    uniq_pids, g_lab = np.unique(g_pids, return_inverse=True)
    g_lab = g_lab.reshape(-1).astype(np.int32)
    n_ids = len(uniq_pids)
    pos = np.clip(np.searchsorted(uniq_pids, q_pids), 0, n_ids - 1)
    q_lab = np.where(uniq_pids[pos] == q_pids, pos, -1).astype(np.int32)

    order = _argsort_rows(distmat)
    ranked_lab = g_lab[order]                        # (num_q, num_g) identity at each rank
    removed = None
    if q_drop is not None and q_drop.any() and g_drop.any():
        removed = g_drop[order]                      # (num_q, num_g) bool
        removed &= q_drop[:, None]
    del order

    matches = ranked_lab == q_lab[:, None]           # (num_q, num_g) bool
    if removed is not None:
        matches &= ~removed

    # True matches are sparse: work on their (row, column) coordinates, which
    # np.nonzero returns grouped by row with columns ascending.
    rows, cols = np.nonzero(matches)
    del matches
    num_rel = np.bincount(rows, minlength=num_q)     # true matches per query
    valid = num_rel > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError('Cannot evaluate: no query has a true match in the gallery.')

    # 1-based rank of each true match within the kept list: its raw position
    # minus the number of skipped entries ahead of it.
    rank_kept = (cols + 1).astype(np.int64)
    if removed is not None:
        # Skipped entries are counted sparsely: flat indices of skipped entries
        # are sorted, so a binary search gives how many precede each match,
        # minus how many precede the start of its row.
        skipped = np.flatnonzero(removed)
        match_flat = rows.astype(np.int64) * num_g + cols
        rank_kept -= (np.searchsorted(skipped, match_flat)
                      - np.searchsorted(skipped, rows.astype(np.int64) * num_g))
        del skipped

    # k-th true match of its query (1-based) = precision numerator at that match.
    starts = np.cumsum(num_rel) - num_rel            # index in rows/cols of each query's first match
    kth = np.arange(len(rows)) - starts[rows] + 1
    ap = np.bincount(rows, weights=kth / rank_kept, minlength=num_q)[valid] / num_rel[valid]
    # mINP: all true matches / rank of the hardest (last) one.
    last = starts[valid] + num_rel[valid] - 1
    inp = num_rel[valid] / rank_kept[last]

    # CMC of one valid query is a step: 0 before the rank r of its first true
    # match, 1 from there on.  So cmc[k] = fraction of valid queries with r <= k+1.
    first_col = cols[starts[valid]]                  # raw position of the first true match
    if not dedup:
        first_rank = first_col + 1
    else:
        # De-duplicated rank = 1 + number of distinct identities among kept
        # entries ranked before the first true match (the true identity is not
        # among them).  Only those (query, position) pairs are gathered, so the
        # work is proportional to how deep the first matches lie, not to num_g.
        vq = np.flatnonzero(valid)
        seg_start = np.cumsum(first_col) - first_col
        qq = np.repeat(np.arange(n_valid), first_col)          # valid-query index
        jj = np.arange(len(qq)) - np.repeat(seg_start, first_col)  # raw position < first_col
        labs = ranked_lab[vq[qq], jj]
        if removed is not None:
            kept = ~removed[vq[qq], jj]
            qq, labs = qq[kept], labs[kept]
        # Mark (query, identity) present; repeated writes of True are harmless.
        present = np.zeros((n_valid, n_ids), dtype=bool)
        present[qq, labs] = True
        first_rank = present.sum(axis=1) + 1
    hits = np.bincount(np.minimum(first_rank, max_rank + 1) - 1, minlength=max_rank + 1)[:max_rank]
    cmc = np.cumsum(hits) / float(n_valid)

    return cmc.astype(np.float64), float(ap.mean()), float(inp.mean())


# ----------------------------------------------------------------------------- test protocols


def inner_product_distance(query_features, gallery_features):
    """(Q, D), (G, D) -> (Q, G) = -q.g: for L2-normalised features, ascending order is descending
    cosine similarity. The distance of the public test scripts, and the default of RetrievalSet."""
    return -query_features @ gallery_features.T


@dataclass
class RetrievalSet:
    """One test's images and features: queries against the gallery of each trial.

    protocol: 'sysu' (camera rule, identity de-duplication: eval_sysu) or 'regdb' (eval_regdb).
    query_paths: Q image paths; query_ids, query_cams: (Q,) int64; query_features: {feature name:
    (Q, D) array}. gallery_*: the same for every gallery image that any trial draws (G of them).
    trial_rows: one (G_t,) int64 array per trial, the gallery rows that trial uses.
    RegDB has no camera numbers: its cams are the modality, 1 visible and 2 thermal.
    """
    protocol: str
    query_paths: list
    query_ids: np.ndarray
    query_cams: np.ndarray
    query_features: dict
    gallery_paths: list
    gallery_ids: np.ndarray
    gallery_cams: np.ndarray
    gallery_features: dict
    trial_rows: list

    @property
    def feature_names(self):
        return tuple(self.query_features)

    def distances(self, name, trial_index, distance=inner_product_distance):
        """(Q, G_t) distances of feature `name` between the queries and the gallery of one trial.
        distance(query (Q, D), gallery (G_t, D)) -> (Q, G_t) array, smaller is closer."""
        rows = self.trial_rows[trial_index]
        return distance(self.query_features[name], self.gallery_features[name][rows])

    def evaluate(self, distance=inner_product_distance):
        """{feature name: [(cmc, mAP, mINP) of each trial]} under the set's protocol."""
        results = {name: [] for name in self.feature_names}
        for trial_index, rows in enumerate(self.trial_rows):
            for name in self.feature_names:
                distmat = self.distances(name, trial_index, distance)
                if self.protocol == 'sysu':
                    scores = eval_sysu(distmat, self.query_ids, self.gallery_ids[rows], self.query_cams,
                                       self.gallery_cams[rows])
                else:
                    scores = eval_regdb(distmat, self.query_ids, self.gallery_ids[rows])
                results[name].append(scores)
        return results

    def ranked_lists(self, distmat, query_indices, trial_index, length=10):
        """The first `length` gallery images of each query in query_indices, as the metrics rank them
        (np.argsort of its row of distmat, (Q, G_t), the SYSU-MM01 camera rule applied).
        Returns one array of positions in the trial's gallery per query (shorter when it is small)."""
        rows = self.trial_rows[trial_index]
        lists = []
        for query in query_indices:
            order = np.argsort(distmat[query])
            if self.protocol == 'sysu':
                skipped = _sysu_skipped(self.query_cams[query:query + 1], self.gallery_cams[rows])
                order = order[~skipped[0][order]]
            lists.append(order[:length])
        return lists


def sysu_retrieval_set(extract, data_path, mode='all', shot='single', trials=range(10)):
    """SYSU-MM01: infrared queries (cam3, cam6) against a visible gallery drawn anew for each trial.

    extract(paths, modal) -> {feature name: (N, D) array}, modal 1 visible, 2 infrared; features
    are compared by inner product (L2-normalise them for cosine) unless another distance is given
    to RetrievalSet.evaluate. Every distinct gallery image is extracted once, however many trials
    draw it.
    """
    query_paths, query_ids, query_cams = process_query_sysu(data_path, mode)
    galleries = [process_gallery_sysu(data_path, mode, trial, shot) for trial in trials]
    labels = {path: (pid, cam) for paths, pids, cams in galleries for path, pid, cam in zip(paths, pids, cams)}
    gallery_paths = sorted(labels)
    row_of = {path: row for row, path in enumerate(gallery_paths)}
    query_features = extract(query_paths, 2)
    gallery_features = extract(gallery_paths, 1)
    return RetrievalSet(
        'sysu', query_paths, query_ids, query_cams, query_features,
        gallery_paths, np.array([labels[path][0] for path in gallery_paths], dtype=np.int64),
        np.array([labels[path][1] for path in gallery_paths], dtype=np.int64), gallery_features,
        trial_rows=[np.array([row_of[path] for path in paths], dtype=np.int64) for paths, _, _ in galleries])


def regdb_retrieval_set(extract, data_path, trial=1, tvsearch=False):
    """RegDB, one split: visible queries against the thermal gallery (thermal to visible with
    tvsearch), one trial. extract as for sysu_retrieval_set."""
    visible_paths, visible_ids = process_test_regdb(data_path, trial, 'visible')
    thermal_paths, thermal_ids = process_test_regdb(data_path, trial, 'thermal')
    # Visible images first, whatever the direction: the order of the public code, whose random
    # draws test.py's seeded stripe permutations follow.
    visible = (visible_paths, visible_ids, np.full(len(visible_ids), 1, dtype=np.int64), extract(visible_paths, 1))
    thermal = (thermal_paths, thermal_ids, np.full(len(thermal_ids), 2, dtype=np.int64), extract(thermal_paths, 2))
    query, gallery = (thermal, visible) if tvsearch else (visible, thermal)
    return RetrievalSet('regdb', *query, *gallery, trial_rows=[np.arange(len(gallery[0]), dtype=np.int64)])


def average_results(results):
    """Mean (cmc, mAP, mINP) over a list of per-trial results."""
    cmcs, mAPs, mINPs = zip(*results)
    return np.mean(cmcs, axis=0), float(np.mean(mAPs)), float(np.mean(mINPs))
