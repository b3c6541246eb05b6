"""Choose block boundaries: the fewest blocks that each fit a board, then the fastest slowest block.

A model is ``n`` units; a block is a range ``[lo, hi)`` of consecutive units. Given what each range
costs (compute: its multiply-accumulates) and needs (its estimated peak memory), and the boards'
allowances, :func:`search_split` returns the split that, in this order,

1. fits: every block's memory is at most the allowance of the board it is given;
2. uses the fewest blocks;
3. has the smallest largest block cost (the slowest block, which sets the pace of the pipeline).

Either one kind of board, as many as the split needs (``reuse=True``), or a list of boards, each
taking at most one block (heterogeneous boards: the search also chooses which board takes which
block, so a big block may go to the big board whatever the order they were listed in).

It is an exact dynamic programme over (first unit, boards left, blocks left); memory is asked
for lazily, only for a range that could still improve on the best split found for its state,
because each answer may cost an export. Pure Python, no torch: the exporter supplies the two
range functions (:mod:`edgebll.export.range_memory`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

RangeCost = Callable[[int, int], float]
"""cost(lo, hi) of the block made of units lo .. hi-1."""
RangeMemory = Callable[[int, int], int]
"""Estimated peak bytes of training units lo .. hi-1 as one block."""


@dataclass(frozen=True, slots=True)
class Split:
    """Where the blocks start and end, and which board takes each."""

    bounds: tuple[int, ...]
    """``(0, b1, ..., n)``: block k is units ``bounds[k] .. bounds[k+1]-1``."""
    boards: tuple[int, ...]
    """Per block, the index of its board in the allowances given (all 0 with ``reuse``)."""
    max_cost: float
    """Cost of the costliest block."""

    @property
    def num_blocks(self) -> int:
        return len(self.bounds) - 1

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.bounds[:-1], self.bounds[1:]))


def search_split(num_units: int, cost: RangeCost, memory: RangeMemory, allowances: Sequence[int], *,
                 reuse: bool = False, min_blocks: int = 1, max_blocks: int | None = None) -> Split | None:
    """The fewest-blocks, then smallest-largest-cost split whose every block fits its board; None if none fits.

    ``allowances``: bytes each board lets one block use. With ``reuse`` there must be exactly one,
    and every block goes to a board like it; otherwise each board takes at most one block and some
    may stay unused. ``min_blocks``/``max_blocks`` bound K (BLL needs at least 2). Ties in cost go
    to the earliest boundaries and to boards in the order given.
    """
    if num_units < 1:
        raise ValueError(f"a model has at least one unit, got {num_units}")
    if not allowances or (reuse and len(allowances) != 1):
        raise ValueError(f"reuse needs exactly one allowance, a board list at least one; got {list(allowances)}")
    # Boards with the same allowance are interchangeable for fitting: the state counts each kind left.
    kinds = list(dict.fromkeys(allowances))
    counts = (num_units,) if reuse else tuple(list(allowances).count(a) for a in kinds)
    most = min(num_units, len(allowances) if not reuse else num_units, max_blocks or num_units)
    known: dict[tuple[int, int], int] = {}

    def needs(lo: int, hi: int) -> int:
        if (lo, hi) not in known:
            known[lo, hi] = int(memory(lo, hi))
        return known[lo, hi]

    @lru_cache(maxsize=None)
    def best(first: int, left: tuple[int, ...], blocks: int) -> tuple[float, tuple[tuple[int, int], ...]] | None:
        """Smallest largest cost of splitting units first.. into ``blocks`` fitting blocks, with (end, kind) per block."""
        if first == num_units:
            return (0.0, ()) if blocks == 0 else None
        if blocks == 0 or num_units - first < blocks:
            return None
        found: tuple[float, tuple[tuple[int, int], ...]] | None = None
        for end in range(first + 1, num_units - blocks + 2):
            here = float(cost(first, end))
            if found is not None and here >= found[0]:
                continue  # this block alone is already as slow as the best split found
            for kind, count in enumerate(left):
                if count == 0:
                    continue
                rest = best(end, left if reuse else left[:kind] + (count - 1,) + left[kind + 1:], blocks - 1)
                if rest is None or (found is not None and max(here, rest[0]) >= found[0]):
                    continue
                if needs(first, end) > kinds[kind]:
                    continue  # asked last: it may cost an export
                found = (max(here, rest[0]), ((end, kind),) + rest[1])
        return found

    for blocks in range(max(1, min_blocks), most + 1):
        result = best(0, counts, blocks)
        if result is not None:
            return Split(bounds=(0, *(end for end, _ in result[1])), boards=_board_indices(result[1], kinds, allowances,
                                                                                           reuse),
                         max_cost=result[0])
    return None


def _board_indices(blocks: tuple[tuple[int, int], ...], kinds: list[int], allowances: Sequence[int],
                   reuse: bool) -> tuple[int, ...]:
    """The j-th block given a kind of board goes to the j-th listed board of that kind."""
    if reuse:
        return (0,) * len(blocks)
    unused = {kind: [i for i, a in enumerate(allowances) if a == allowance] for kind, allowance in enumerate(kinds)}
    return tuple(unused[kind].pop(0) for _, kind in blocks)
