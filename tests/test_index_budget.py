"""fill_budget: SEPT's per-instance round robin, with dedup and best scores."""

import numpy as np

from sept.index.budget import fill_budget, neighbours_needed


def test_round_robin_gives_each_query_its_share():
    # query 0's neighbours are all better than query 1's; a global top-k would take only query 0's
    D = np.array([[0.99, 0.98, 0.97, 0.96], [0.5, 0.4, 0.3, 0.2]], dtype=np.float32)
    I = np.array([[1, 2, 3, 4], [10, 11, 12, 13]])
    sel = fill_budget(D, I, 4)
    assert sel.ids.tolist() == [1, 10, 2, 11]


def test_duplicates_kept_once_with_best_score_and_all_queries():
    D = np.array([[0.9, 0.8], [0.95, 0.1]], dtype=np.float32)
    I = np.array([[7, 8], [7, 9]])
    sel = fill_budget(D, I, 3)
    assert sel.ids.tolist() == [7, 8, 9]
    assert sel.scores[0] == np.float32(0.95)
    assert sel.retrieved_by[0] == [0, 1]


def test_l2_keeps_smallest_distance_and_skips_padding():
    D = np.array([[0.5, 0.7], [0.2, np.inf]], dtype=np.float32)
    I = np.array([[3, 4], [3, -1]])
    sel = fill_budget(D, I, 5, metric="l2")
    assert sel.ids.tolist() == [3, 4]
    assert sel.scores[0] == np.float32(0.2)


def test_neighbours_needed_bounded_by_pool():
    assert neighbours_needed(100, 10, 15) == 15
    assert neighbours_needed(100, 10, 10_000) == 20
