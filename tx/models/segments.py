"""A model's layers as segments: runs of a repeating unit of blocks, each run one compiled layer under the scan.

A checkpoint's layer pattern (all alike; the first k dense then sparse; every 2nd layer sparse; local / global
attention) is a list of :class:`~tx.models.config.BlockSpec`, one per layer. :func:`plan_segments` covers it with
segments: a segment is a *unit* of ``p`` consecutive specs repeated ``r`` times; the model stacks each unit
position's weights on an ``r`` axis and scans over the repeats, so the compiled code has one copy of each unit,
whatever the depth. Examples (D dense, S sparse)::

    D D D D D D        -> [D] x 6
    D D D S S S S S    -> [D] x 3, [S] x 5             (DeepSeek's first_k_dense_replace)
    D S D S D S        -> [D S] x 3                     (Qwen-MoE decoder_sparse_step = 2)
    D S D S D          -> [D S] x 2, [D] x 1
"""

from __future__ import annotations

import dataclasses

from tx.models.config import BlockSpec

MAX_UNIT = 8  # longest repeating unit searched for


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    """``unit`` repeated ``repeats`` times from layer ``start`` on."""

    start: int
    unit: tuple[BlockSpec, ...]
    repeats: int

    def layer_ids(self, position: int) -> tuple[int, ...]:
        """Global layer indices held by unit position ``position``, one per repeat (the stack order)."""
        p = len(self.unit)
        return tuple(self.start + r * p + position for r in range(self.repeats))

    @property
    def num_layers(self) -> int:
        return len(self.unit) * self.repeats


def plan_segments(specs: tuple[BlockSpec, ...] | list[BlockSpec]) -> list[SegmentPlan]:
    """Cover ``specs`` from the left, each time with the unit (length <= :data:`MAX_UNIT`) that repeats at least
    twice and covers the most layers (the shortest unit on ties); a single layer where no unit repeats."""
    specs = tuple(specs)
    plans, pos = [], 0
    while pos < len(specs):
        best = (1, 1)
        for p in range(1, min(MAX_UNIT, len(specs) - pos) + 1):
            unit = specs[pos : pos + p]
            r = 1
            while specs[pos + r * p : pos + (r + 1) * p] == unit:
                r += 1
            if r >= 2 and p * r > best[0] * best[1]:
                best = (p, r)
        p, r = best
        plans.append(SegmentPlan(pos, specs[pos : pos + p], r))
        pos += p * r
    return plans
