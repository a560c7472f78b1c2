"""Tests for eval_metrics: hand-worked cases and a per-query reference implementation."""
import os
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import eval_metrics  # noqa: E402
from eval_metrics import eval_regdb, eval_sysu, summarize  # noqa: E402


def ranking_to_distmat(rankings, num_g):
    """Each ranking lists gallery indices nearest first; distance = position in it."""
    d = np.zeros((len(rankings), num_g))
    for q, ranking in enumerate(rankings):
        assert sorted(ranking) == list(range(num_g))
        d[q, ranking] = np.arange(num_g)
    return d


# ---------------------------------------------------------------------------
# Reference: one query at a time, straight from the definitions.
# ---------------------------------------------------------------------------

def reference_eval(distmat, q_pids, g_pids, q_camids=None, g_camids=None, max_rank=20, sysu=True):
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    cmc_sum = np.zeros(max_rank)
    aps, inps = [], []
    for q in range(num_q):
        ranked = list(np.argsort(distmat[q]))
        if sysu and q_camids[q] == 3:
            ranked = [g for g in ranked if g_camids[g] != 2]
        ranked_pids = [g_pids[g] for g in ranked]
        hits = [i for i, p in enumerate(ranked_pids) if p == q_pids[q]]   # 0-based kept positions
        if not hits:
            continue  # invalid query: contributes to nothing, not even the divisor
        # AP: mean over the true matches of (matches so far) / (rank).
        aps.append(np.mean([(k + 1) / (i + 1) for k, i in enumerate(hits)]))
        inps.append(len(hits) / (hits[-1] + 1))
        if sysu:
            id_list, seen = [], set()
            for p in ranked_pids:
                if p not in seen:
                    seen.add(p)
                    id_list.append(p)
        else:
            id_list = ranked_pids
        curve = []
        found = 0
        for k in range(max_rank):
            if k < len(id_list) and id_list[k] == q_pids[q]:
                found = 1
            curve.append(found)  # past the end of id_list the last value is kept
        cmc_sum += np.array(curve)
    if not aps:
        raise AssertionError('reference: no valid query')
    return cmc_sum / len(aps), float(np.mean(aps)), float(np.mean(inps))


# ---------------------------------------------------------------------------
# Hand-worked case shared by several tests.
#
# gallery  g0   g1   g2   g3   g4   g5
# pid       1    2    2    1    3    4
# cam       2    1    4    5    1    2
# ---------------------------------------------------------------------------
G_PIDS = np.array([1, 2, 2, 1, 3, 4])
G_CAMS = np.array([2, 1, 4, 5, 1, 2])
RANKINGS = [
    [0, 1, 2, 3, 4, 5],  # q0 pid 1 cam 3
    [1, 2, 0, 4, 3, 5],  # q1 pid 3 cam 6
    [0, 1, 2, 3, 4, 5],  # q2 pid 4 cam 3
    [2, 0, 1, 3, 4, 5],  # q3 pid 2 cam 6
]
Q_PIDS = np.array([1, 3, 4, 2])
Q_CAMS = np.array([3, 6, 3, 6])
DIST = ranking_to_distmat(RANKINGS, 6)


def test_sysu_hand_case():
    # q0 (cam 3): g0 and g5 (cam 2) are dropped -> kept pids [2, 2, 1, 3]; match at
    #     kept rank 3 -> AP 1/3, mINP 1/3; identity list [2, 1, 3] -> CMC rank 2.
    # q1 (cam 6): pids [2, 2, 1, 3, 1, 4]; match at rank 4 -> AP 1/4, mINP 1/4;
    #     identity list [2, 1, 3, 4] -> CMC rank 3.
    # q2 (cam 3): its only match g5 is in cam 2 -> invalid, excluded everywhere.
    # q3 (cam 6): pids [2, 1, 2, 1, 3, 4]; matches at ranks 1 and 3
    #     -> AP (1/1 + 2/3)/2 = 5/6, mINP 2/3, CMC rank 1.
    # max_rank 20 is clipped to 6; 3 valid queries with CMC ranks {2, 3, 1}.
    cmc, mAP, mINP = eval_sysu(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)
    np.testing.assert_allclose(cmc, [1 / 3, 2 / 3, 1, 1, 1, 1], atol=1e-12)
    assert mAP == pytest.approx((1 / 3 + 1 / 4 + 5 / 6) / 3)   # 17/36
    assert mINP == pytest.approx((1 / 3 + 1 / 4 + 2 / 3) / 3)  # 5/12
    assert cmc.dtype.kind == 'f' and cmc.shape == (6,)


def test_regdb_hand_case_no_dedup_no_camera_rule():
    # Same lists, nothing dropped, no de-duplication:
    # q0: pids [1, 2, 2, 1, 3, 4]  matches at 1, 4 -> AP (1 + 2/4)/2 = 3/4, mINP 2/4, rank 1
    # q1: pids [2, 2, 1, 3, 1, 4]  match at 4      -> AP 1/4, mINP 1/4, rank 4 (SYSU said 3)
    # q2: pids [1, 2, 2, 1, 3, 4]  match at 6      -> AP 1/6, mINP 1/6, rank 6
    # q3: pids [2, 1, 2, 1, 3, 4]  matches at 1, 3 -> AP 5/6, mINP 2/3, rank 1
    cmc, mAP, mINP = eval_regdb(DIST, Q_PIDS, G_PIDS)
    np.testing.assert_allclose(cmc, [2 / 4, 2 / 4, 2 / 4, 3 / 4, 3 / 4, 1], atol=1e-12)
    assert mAP == pytest.approx((3 / 4 + 1 / 4 + 1 / 6 + 5 / 6) / 4)   # 1/2
    assert mINP == pytest.approx((1 / 2 + 1 / 4 + 1 / 6 + 2 / 3) / 4)  # 19/48


def test_sysu_camera_rule_skips_cam2_entries_in_ranking():
    # Gallery: g0 pid 5 cam 2, g1 pid 1 cam 1; one query of pid 1 ranks g0 first.
    d = np.array([[0.1, 0.2]])
    g_pids, g_cams = np.array([5, 1]), np.array([2, 1])
    # From cam 3 the cam-2 impostor g0 is skipped: the match is at rank 1.
    cmc, mAP, mINP = eval_sysu(d, np.array([1]), g_pids, np.array([3]), g_cams)
    np.testing.assert_allclose(cmc, [1, 1])
    assert (mAP, mINP) == (pytest.approx(1.0), pytest.approx(1.0))
    # From cam 6 nothing is skipped: match at rank 2 -> AP 1/2, mINP 1/2.
    cmc, mAP, mINP = eval_sysu(d, np.array([1]), g_pids, np.array([6]), g_cams)
    np.testing.assert_allclose(cmc, [0, 1])
    assert (mAP, mINP) == (pytest.approx(0.5), pytest.approx(0.5))


def test_sysu_camera_rule_drops_cam2_true_match():
    # q0 of the hand case from cam 6 instead of cam 3: g0 (its cam-2 match) now counts.
    # pids [1, 2, 2, 1, 3, 4]: matches at 1 and 4 -> AP 3/4, mINP 1/2, Rank-1 hit.
    cmc, mAP, mINP = eval_sysu(DIST[:1], Q_PIDS[:1], G_PIDS, np.array([6]), G_CAMS)
    assert cmc[0] == 1 and mAP == pytest.approx(3 / 4) and mINP == pytest.approx(1 / 2)
    # From cam 3 (hand case q0): AP 1/3, mINP 1/3, identity rank 2.
    cmc, mAP, mINP = eval_sysu(DIST[:1], Q_PIDS[:1], G_PIDS, np.array([3]), G_CAMS)
    np.testing.assert_allclose(cmc, [0, 1, 1, 1, 1, 1])
    assert mAP == pytest.approx(1 / 3) and mINP == pytest.approx(1 / 3)


def test_sysu_dedup_wrong_identity_twice_counts_once():
    # Ranked pids [7, 7, 7, 1]: identity list [7, 1] -> SYSU CMC hit at rank 2,
    # while RegDB (raw list) hits at rank 4.  AP = mINP = 1/4 for both.
    d = np.array([[0.1, 0.2, 0.3, 0.4]])
    g_pids = np.array([7, 7, 7, 1])
    cmc, mAP, mINP = eval_sysu(d, np.array([1]), g_pids, np.array([6]), np.array([1, 4, 5, 1]))
    np.testing.assert_allclose(cmc, [0, 1, 1, 1])
    assert mAP == pytest.approx(0.25) and mINP == pytest.approx(0.25)
    cmc, mAP, mINP = eval_regdb(d, np.array([1]), g_pids)
    np.testing.assert_allclose(cmc, [0, 0, 0, 1])
    assert mAP == pytest.approx(0.25) and mINP == pytest.approx(0.25)


def test_invalid_query_excluded_from_means_and_divisor():
    # Dropping the invalid q2 of the hand case changes nothing.
    keep = [0, 1, 3]
    full = eval_sysu(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)
    part = eval_sysu(DIST[keep], Q_PIDS[keep], G_PIDS, Q_CAMS[keep], G_CAMS)
    np.testing.assert_allclose(full[0], part[0], atol=1e-12)
    assert full[1] == pytest.approx(part[1]) and full[2] == pytest.approx(part[2])
    # A query whose pid is absent from the gallery is invalid too (RegDB):
    # q0 matches at rank 1 (AP 1, mINP 1); q1 (pid 9) has no match.
    d = np.array([[0.1, 0.2], [0.3, 0.4]])
    cmc, mAP, mINP = eval_regdb(d, np.array([1, 9]), np.array([1, 2]))
    np.testing.assert_allclose(cmc, [1, 1])  # divided by 1 valid query, not 2
    assert mAP == pytest.approx(1.0) and mINP == pytest.approx(1.0)


def test_minp_value():
    # Ranked pids [1, 2, 1, 2, 2, 1] for a pid-1 query: matches at 1, 3, 6.
    # mINP = 3 / 6 = 0.5; AP = (1/1 + 2/3 + 3/6) / 3 = 13/18.
    d = np.arange(6, dtype=float)[None]
    g_pids = np.array([1, 2, 1, 2, 2, 1])
    for cmc, mAP, mINP in (eval_regdb(d, np.array([1]), g_pids),
                           eval_sysu(d, np.array([1]), g_pids, np.array([3]), np.array([1, 4, 5, 1, 4, 5]))):
        assert mINP == pytest.approx(0.5)
        assert mAP == pytest.approx(13 / 18)
        assert cmc[0] == 1


def test_max_rank_clipped_to_tiny_gallery():
    d = np.array([[0.3, 0.1, 0.2]])          # ranked g1, g2, g0 -> pids [2, 3, 1]
    q_pids, g_pids = np.array([1]), np.array([1, 2, 3])
    cmc, _, _ = eval_regdb(d, q_pids, g_pids, max_rank=20)
    np.testing.assert_allclose(cmc, [0, 0, 1])
    cmc, _, _ = eval_regdb(d, q_pids, g_pids, max_rank=2)
    np.testing.assert_allclose(cmc, [0, 0])
    cmc, _, _ = eval_sysu(d, q_pids, g_pids, np.array([6]), np.array([1, 4, 5]), max_rank=20)
    assert cmc.shape == (3,)
    np.testing.assert_allclose(cmc, [0, 0, 1])


def test_sysu_identity_list_shorter_than_max_rank_keeps_last_value():
    # Ranked pids [2, 2, 1, 1, 2]: identity list [2, 1] (length 2 < max_rank 5).
    d = np.arange(5, dtype=float)[None]
    cmc, _, _ = eval_sysu(d, np.array([1]), np.array([2, 2, 1, 1, 2]), np.array([6]), np.ones(5, int))
    np.testing.assert_allclose(cmc, [0, 1, 1, 1, 1])


def test_no_valid_query_raises():
    d = np.array([[0.1, 0.2]])
    with pytest.raises(ValueError, match='no query has a true match in the gallery'):
        eval_regdb(d, np.array([9]), np.array([1, 2]))
    # The only true match is in camera 2 and the query is from camera 3.
    with pytest.raises(ValueError, match='no query has a true match in the gallery'):
        eval_sysu(d, np.array([1]), np.array([1, 2]), np.array([3]), np.array([2, 1]))


def test_summarize():
    s = summarize(np.array([0.1234, 0.2, 0.3, 0.4, 0.5, 0.6]), 0.25, 0.125)
    assert s == 'Rank-1: 12.34% | Rank-5: 50.00% | mAP: 25.00% | mINP: 12.50%'
    s = summarize(np.linspace(0.05, 1.0, 20), 0.5, 0.4)
    assert s == 'Rank-1: 5.00% | Rank-5: 25.00% | Rank-10: 50.00% | Rank-20: 100.00% | mAP: 50.00% | mINP: 40.00%'


# ---------------------------------------------------------------------------
# Random cases against the reference.
# ---------------------------------------------------------------------------

def random_case(rng, num_q, num_g, n_ids, ties):
    g_pids = rng.integers(0, n_ids, num_g)
    # Some query identities are outside the gallery (invalid queries).
    q_pids = rng.integers(0, n_ids + max(1, n_ids // 5), num_q)
    q_cams = rng.choice([3, 6], num_q)
    g_cams = rng.choice([1, 2, 4, 5], num_g)
    if ties:
        d = rng.integers(0, 4, (num_q, num_g)).astype(np.float32)  # many exact ties
    else:
        d = rng.random((num_q, num_g))
    return d, q_pids, g_pids, q_cams, g_cams


CASES = [(seed, nq, ng, nid, ties, mr)
         for seed, (nq, ng, nid, ties, mr) in enumerate([
             (1, 1, 1, False, 20), (5, 3, 2, False, 20), (20, 15, 4, False, 20),
             (30, 40, 10, True, 20), (50, 60, 30, False, 10), (40, 200, 8, False, 20),
             (64, 100, 100, False, 20), (25, 30, 3, True, 50), (80, 150, 20, True, 5),
             (120, 300, 40, False, 20), (10, 8, 2, False, 20), (60, 500, 96, False, 20),
         ] * 3)]


@pytest.mark.parametrize('seed,num_q,num_g,n_ids,ties,max_rank', CASES)
def test_random_against_reference(seed, num_q, num_g, n_ids, ties, max_rank):
    rng = np.random.default_rng(seed)
    d, q_pids, g_pids, q_cams, g_cams = random_case(rng, num_q, num_g, n_ids, ties)
    for sysu in (True, False):
        try:
            expected = reference_eval(d, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank, sysu=sysu)
        except AssertionError:
            with pytest.raises(ValueError):
                if sysu:
                    eval_sysu(d, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
                else:
                    eval_regdb(d, q_pids, g_pids, max_rank=max_rank)
            continue
        if sysu:
            got = eval_sysu(d, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
        else:
            got = eval_regdb(d, q_pids, g_pids, max_rank=max_rank)
        assert got[0].shape == (min(max_rank, num_g),)
        np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-6)
        assert abs(got[1] - expected[1]) < 1e-6
        assert abs(got[2] - expected[2]) < 1e-6


def test_random_cases_cover_interesting_situations():
    # Guard that the random suite really exercises invalid queries, the camera
    # rule, and SYSU/RegDB disagreement (otherwise the comparison above is weak).
    saw_invalid = saw_diff = saw_dropped_match = False
    for seed, nq, ng, nid, ties, mr in CASES:
        rng = np.random.default_rng(seed)
        d, q_pids, g_pids, q_cams, g_cams = random_case(rng, nq, ng, nid, ties)
        in_gallery = np.isin(q_pids, g_pids)
        saw_invalid |= bool((~in_gallery).any())
        for q in np.flatnonzero(q_cams == 3):
            saw_dropped_match |= bool(((g_pids == q_pids[q]) & (g_cams == 2)).any())
        if in_gallery.any() and ng >= 50:
            s = eval_sysu(d, q_pids, g_pids, np.full(nq, 6), g_cams, max_rank=mr)[0]
            r = eval_regdb(d, q_pids, g_pids, max_rank=mr)[0]
            saw_diff |= not np.allclose(s, r)
    assert saw_invalid and saw_diff and saw_dropped_match


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_threaded_argsort_path_against_reference(monkeypatch, seed):
    # Force the row-block threaded argsort even for small matrices; with many
    # ties it must still give exactly np.argsort's order (checked via the reference).
    monkeypatch.setattr(eval_metrics, '_PARALLEL_MIN_ENTRIES', 0)
    rng = np.random.default_rng(100 + seed)
    d, q_pids, g_pids, q_cams, g_cams = random_case(rng, 70, 90, 12, ties=True)
    got = eval_sysu(d, q_pids, g_pids, q_cams, g_cams)
    expected = reference_eval(d, q_pids, g_pids, q_cams, g_cams, sysu=True)
    np.testing.assert_allclose(got[0], expected[0], atol=1e-6)
    assert abs(got[1] - expected[1]) < 1e-6 and abs(got[2] - expected[2]) < 1e-6
    got = eval_regdb(d, q_pids, g_pids)
    expected = reference_eval(d, q_pids, g_pids, sysu=False)
    np.testing.assert_allclose(got[0], expected[0], atol=1e-6)
    assert abs(got[1] - expected[1]) < 1e-6 and abs(got[2] - expected[2]) < 1e-6


def test_threaded_argsort_equals_numpy_on_large_tied_matrix():
    rng = np.random.default_rng(7)
    d = rng.integers(0, 50, (1100, 1000)).astype(np.float32)  # above the threading size, many ties
    np.testing.assert_array_equal(eval_metrics._argsort_rows(d), np.argsort(d, axis=1))


def test_sysu_multishot_size_timing():
    # Not a timing assertion: prints the time of a SYSU-sized evaluation.
    rng = np.random.default_rng(123)
    num_q, num_g = 3803, 3840
    d, q_pids, g_pids, q_cams, g_cams = random_case(rng, num_q, num_g, 395, ties=False)
    d = d.astype(np.float32)
    t0 = time.perf_counter()
    cmc, mAP, mINP = eval_sysu(d, q_pids, g_pids, q_cams, g_cams)
    t_sysu = time.perf_counter() - t0
    t0 = time.perf_counter()
    eval_regdb(d, q_pids, g_pids)
    t_regdb = time.perf_counter() - t0
    print('\n[eval_metrics] {}x{}: eval_sysu {:.3f}s, eval_regdb {:.3f}s'.format(num_q, num_g, t_sysu, t_regdb))
    assert cmc.shape == (20,) and np.all(np.diff(cmc) >= 0) and 0 < cmc[-1] <= 1
    assert 0 < mAP <= 1 and 0 < mINP <= 1
