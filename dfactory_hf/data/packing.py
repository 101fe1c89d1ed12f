"""The two packing routines of the package: best fit (planning) and next fit (laying out what was planned).

`best_fit` plans: the token-budget sampler packs documents with it into micro-batches (under each step's budget) or
into rows of `max_seq_len`, and the packing collator, given documents that no sampler planned, into rows. `next_fit`
lays documents out in the order given: the rows of a micro-batch the sampler listed row by row.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence


def best_fit(sizes: Sequence[int], capacity: int | Callable[[int], int], *, padded: bool = False) -> list[list[int]]:
    """Best-fit decreasing: rows of positions into `sizes`, longest first (the given order on a tie), each into the
    open row with the least room that still holds it (the earliest row on a tie), else into a new row.

    `capacity` is a row's size, or a function of the row's number (a row opened later may hold more: the batch-size
    warmup). With `padded`, a row costs its number of items times its longest (its first) item, as padded rows do.
    """
    rows: list[list[int]] = []
    capacities: list[int] = []
    used: list[int] = []
    open_keys: list[tuple[int, int]] = []  # (room for the next item, row), sorted: the least room that fits
    for position in sorted(range(len(sizes)), key=sizes.__getitem__, reverse=True):
        size = sizes[position]
        # A padded row's next item costs the row's first (longest) item, whatever its own size.
        at = bisect.bisect_left(open_keys, (0 if padded else size, -1))
        if at < len(open_keys):
            row = open_keys.pop(at)[1]
        else:
            row = len(rows)
            rows.append([])
            capacities.append(capacity(row) if callable(capacity) else capacity)
            used.append(0)
        rows[row].append(position)
        used[row] += size
        key = capacities[row] - (sizes[rows[row][0]] * (len(rows[row]) + 1) if padded else used[row])
        if key >= (0 if padded else 1):
            bisect.insort(open_keys, (key, row))
    return rows


def next_fit(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of positions into `sizes`, filled in the given order: a new row whenever the next item does not fit.

    For items the row planner (`row_length`) listed row by row, this needs no more rows than it planned.
    """
    rows: list[list[int]] = []
    room = 0
    for position, size in enumerate(sizes):
        if not rows or size > room:
            rows.append([])
            room = capacity
        rows[-1].append(position)
        room -= size
    return rows


def fewest_rows(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of positions into `sizes`: in the given order (next fit) unless best fit needs fewer rows.

    A micro-batch that the row planner listed row by row already needs the fewest rows in order (the usual case, and
    the cheap one); in any other order best-fit decreasing does better.
    """
    check_fits(sizes, capacity)
    in_order = next_fit(sizes, capacity)
    if len(in_order) == -(-sum(sizes) // capacity):  # nothing to improve
        return in_order
    packed = best_fit(sizes, capacity)
    return in_order if len(in_order) <= len(packed) else packed


def check_fits(sizes: Sequence[int], capacity: int) -> None:
    for size in sizes:
        if size > capacity:
            raise ValueError(f"A document of {size} tokens does not fit a row of max_seq_len={capacity} tokens.")
