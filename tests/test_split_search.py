"""The boundary search against brute force on small synthetic cost and memory tables."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgebll.export.split_search import Split, search_split


def _brute_force(n: int, cost: dict, memory: dict, allowances: list[int], reuse: bool,
                 min_blocks: int = 1) -> tuple[int, float] | None:
    """(fewest blocks, smallest largest cost) over every split and every assignment of boards."""
    best = None
    for cuts in itertools.chain.from_iterable(itertools.combinations(range(1, n), r) for r in range(n)):
        bounds = (0, *cuts, n)
        ranges = list(zip(bounds[:-1], bounds[1:]))
        if len(ranges) < min_blocks:
            continue
        assignments = ([(0,) * len(ranges)] if reuse else itertools.permutations(range(len(allowances)), len(ranges)))
        if any(all(memory[r] <= allowances[b] for r, b in zip(ranges, boards)) for boards in assignments):
            value = (len(ranges), max(cost[r] for r in ranges))
            best = value if best is None or value < best else best
    return best


def _check_valid(split: Split, n: int, memory: dict, allowances: list[int], reuse: bool) -> None:
    assert split.bounds[0] == 0 and split.bounds[-1] == n and list(split.bounds) == sorted(set(split.bounds))
    assert len(split.boards) == split.num_blocks
    if not reuse:
        assert len(set(split.boards)) == len(split.boards)  # a board takes at most one block
    assert all(memory[r] <= allowances[b] for r, b in zip(split.ranges(), split.boards))


def _tables(rng: np.random.Generator, n: int, additive: bool) -> tuple[dict, dict]:
    unit_cost = rng.integers(1, 20, size=n)
    unit_memory = rng.integers(1, 10, size=n)
    cost, memory = {}, {}
    for lo in range(n):
        for hi in range(lo + 1, n + 1):
            # head-like extras make costs non-additive; non-additive memory tables test no monotonicity is assumed
            cost[lo, hi] = float(unit_cost[lo:hi].sum() + (0 if hi == n else rng.integers(0, 5)))
            memory[lo, hi] = int(unit_memory[lo:hi].sum()) if additive else int(rng.integers(1, 10 * (hi - lo) + 1))
    return cost, memory


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("additive", [True, False])
def test_search_matches_brute_force(reuse: bool, additive: bool) -> None:
    rng = np.random.default_rng(0 if reuse else 1)
    cases = feasible = 0
    for _ in range(60):
        n = int(rng.integers(1, 8))
        cost, memory = _tables(rng, n, additive)
        allowances = [int(rng.integers(3, 30))] if reuse else [int(a) for a in rng.integers(3, 40, size=rng.integers(1, 5))]
        min_blocks = int(rng.integers(1, 3))
        split = search_split(n, lambda lo, hi: cost[lo, hi], lambda lo, hi: memory[lo, hi], allowances, reuse=reuse,
                             min_blocks=min_blocks)
        expected = _brute_force(n, cost, memory, allowances, reuse, min_blocks)
        cases += 1
        if expected is None:
            assert split is None
            continue
        feasible += 1
        assert split is not None and (split.num_blocks, split.max_cost) == expected
        _check_valid(split, n, memory, allowances, reuse)
    assert 10 < feasible < cases  # the tables exercise both outcomes


def test_heterogeneous_boards_are_reordered_to_fit() -> None:
    # units: a big one last; boards listed small first: only big-board-last fits, and the search finds it
    memory = {(0, 1): 5, (1, 2): 5, (2, 3): 50, (0, 2): 10, (1, 3): 55, (0, 3): 60}
    cost = {r: float(hi - lo) for r, (lo, hi) in zip(memory, memory)}
    split = search_split(3, lambda lo, hi: cost[lo, hi], lambda lo, hi: memory[lo, hi], [50, 12, 8])
    assert split == Split(bounds=(0, 2, 3), boards=(1, 0), max_cost=2.0)
    # identical boards: the first listed takes the first block
    split = search_split(3, lambda lo, hi: cost[lo, hi], lambda lo, hi: memory[lo, hi], [60, 60])
    assert split is not None and split.num_blocks == 1 and split.boards == (0,)


def test_fewest_blocks_come_before_balance_and_memory_is_asked_lazily() -> None:
    asked: list[tuple[int, int]] = []

    def memory(lo: int, hi: int) -> int:
        asked.append((lo, hi))
        return hi - lo

    split = search_split(6, lambda lo, hi: float(hi - lo), memory, [6], reuse=True)
    assert split is not None and split.bounds == (0, 6) and asked == [(0, 6)]  # one block fits: nothing else is asked
    split = search_split(6, lambda lo, hi: float(hi - lo), memory, [4], reuse=True)
    assert split is not None and split.num_blocks == 2 and split.max_cost == 3.0  # 2 blocks, balanced 3 + 3
    assert len(set(asked)) < 6 * 7 // 2  # not every range was estimated
    assert search_split(3, lambda lo, hi: 1.0, lambda lo, hi: 10, [9], reuse=True) is None


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="exactly one allowance"):
        search_split(3, lambda lo, hi: 1.0, lambda lo, hi: 1, [1, 2], reuse=True)
    with pytest.raises(ValueError, match="at least one unit"):
        search_split(0, lambda lo, hi: 1.0, lambda lo, hi: 1, [1])
