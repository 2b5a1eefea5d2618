"""`unit_locations` and `subspaces`: every shortcut pyvene accepts, parsed into one canonical form and checked.

Canonical form, per intervention (N of them), per side (source, base): `None` (the whole tensor) or, for a
one-level unit (`pos`, `h`, `t`), a list over the batch of unit-index lists `[[i, j], [k, l]]`; for `h.pos`, a
pair `[heads per example, positions per example]`. (To skip an intervention for one call, pass `None` as its
group's entry in `sources`; interventions that need no source, such as Collect or a constant source, always run.)

Shortcuts (for key `"sources->base"`, or `"base"` for the base side only):

    3                       unit 3 in every example, for every intervention, on both sides
    (6, 3)                  source unit 6 -> base unit 3 (two ints in a *tuple*)
    [0, 1, 2, 3]            units 0..3 (a flat list is always a list of units, also with two ints)
    (src_locs, base_locs)   the canonical per-intervention lists

Departures from pyvene: a flat list is never read as a (source, base) pair (pyvene reads `{"base": [1, 3]}` as
"1 -> 3"); the number of rows must equal the batch size (pyvene silently truncates).
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def GET_LOC(loc: tuple[int, int], unit: str = "h.pos", batch_size: int = 1) -> list:
    """Locations for one `h.pos` intervention: `GET_LOC((head, pos))` -> `[[[[head]] * B, [[pos]] * B]]`."""
    if unit != "h.pos":
        raise ValueError(f"GET_LOC builds 'h.pos' locations only, got unit={unit!r}")
    return [[[[loc[0]]] * batch_size, [[loc[1]]] * batch_size]]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class EntryCountError(ValueError, IndexError):
    """unit_locations or subspaces with the wrong number of entries (one per intervention is needed). Both a
    ValueError (a bad argument) and an IndexError, the type pyvene raises for it, so code written for either
    catches it."""


def _flat_ints(x: Any) -> bool:
    return isinstance(x, list | tuple) and len(x) > 0 and all(_is_int(i) for i in x)


def _broadcast(value: Any, n: int, batch: int) -> list | None:
    """An int or a flat int list -> the same index list for every example of every intervention; else None."""
    if _is_int(value):
        return [[[value]] * batch for _ in range(n)]
    if _flat_ints(value):
        return [[list(value)] * batch for _ in range(n)]
    return None


def expand_side(value: Any, n: int, batch: int) -> list:
    """One side of a shortcut -> a per-intervention list of length n."""
    if value is None:
        return [None] * n
    shortcut = _broadcast(value, n, batch)
    if shortcut is not None:
        return shortcut
    if isinstance(value, list | tuple) and len(value) == n:
        return list(value)
    if isinstance(value, list | tuple):
        raise EntryCountError(f"unit locations {value!r} have {len(value)} entries for {n} interventions; give one "
                              f"entry per intervention (None skips it), an int, or a flat list of ints")
    raise ValueError(f"cannot read unit locations {value!r}: expected an int, a flat list of ints, or a list with "
                     f"one entry per intervention ({n})")


def parse_pair(value: Any, n: int, batch: int, base_only: bool) -> tuple[list, list]:
    """A `"sources->base"` (or `"base"`) value -> (source locations, base locations), each of length n."""
    if base_only:
        return [None] * n, expand_side(value, n, batch)
    if isinstance(value, tuple) and len(value) == 2:  # (a, b), (None, b), or the canonical (src_locs, base_locs)
        return expand_side(value[0], n, batch), expand_side(value[1], n, batch)
    side = expand_side(value, n, batch)
    return side, side


@dataclass
class Selection:
    """Where to act in a view: per unit level, a (batch, n) list of indices. Builds index tensors once."""

    levels: list[list[list[int]]]  # for h.pos: [heads [B][nh], positions [B][np]]; else [[B][n]]
    _cache: dict[Any, tuple[Tensor, ...]] = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return len(self.levels[0])

    def index(self, device: torch.device) -> tuple[Tensor, ...]:
        """Advanced-indexing tensors: view[index] -> (batch, n_level1[, n_level2], ...rest)."""
        if device not in self._cache:
            b = len(self.levels[0])
            k = len(self.levels)
            idx = [torch.arange(b, device=device).view(b, *[1] * k)]
            for lvl, rows in enumerate(self.levels):
                t = torch.tensor(rows, dtype=torch.long, device=device)
                shape = [b] + [1] * k
                shape[1 + lvl] = t.shape[1]
                idx.append(t.view(shape))
            self._cache[device] = tuple(idx)
        return self._cache[device]

    def step_rows(self, t: int) -> list[tuple[int, int]]:
        """(row, unit slot) pairs whose time-step list holds step t (unit `t`)."""
        return [(r, j) for r, steps in enumerate(self.levels[0]) for j, s in enumerate(steps) if s == t]

    def check(self, shape: tuple[int, ...], dims: tuple[int, ...], what: str, names: tuple[str, ...]) -> None:
        if self.rows != shape[0]:
            raise ValueError(f"{what}: unit_locations have {self.rows} rows but the batch has {shape[0]} examples")
        for lvl, (rows, dim) in enumerate(zip(self.levels, dims)):
            top = max((i for r in rows for i in r), default=0)
            low = min((i for r in rows for i in r), default=0)
            if top >= shape[dim] or low < 0:
                bad = top if top >= shape[dim] else low
                raise ValueError(f"{what}: {names[lvl]} index {bad} is out of range; this tensor has {shape[dim]} "
                                 f"{names[lvl]}s (shape {tuple(shape)})")


def make_selection(loc: Any, unit: str, batch: int, what: str) -> Selection | None:
    """Validate one intervention's canonical location entry and wrap it."""
    if loc is None:
        return None
    levels = loc if unit == "h.pos" else [loc]
    if unit == "h.pos" and (not isinstance(loc, list | tuple) or len(loc) != 2):
        raise ValueError(f"{what}: 'h.pos' locations must be [heads per example, positions per example], got {loc!r}")
    out = []
    for rows in levels:
        if not isinstance(rows, list | tuple) or not all(isinstance(r, list | tuple) for r in rows):
            raise ValueError(f"{what}: expected one list of unit indices per example, got {rows!r}")
        if len(rows) != batch:
            raise ValueError(f"{what}: unit_locations have {len(rows)} rows but the batch has {batch} examples")
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"{what}: every example must select the same number of units, got {rows!r}")
        if not all(_is_int(i) for r in rows for i in r):
            raise ValueError(f"{what}: unit indices must be ints, got {rows!r}")
        out.append([list(r) for r in rows])
    return Selection(out)


def parse_subspaces(subspaces: Any, n: int, batch: int) -> list:
    """`subspaces` -> a per-intervention list (None, or one index list per example, or anything custom)."""
    if subspaces is None:
        return [None] * n
    shortcut = _broadcast(subspaces, n, batch)
    if shortcut is not None:
        return shortcut
    if isinstance(subspaces, list | tuple):
        if len(subspaces) != n:
            raise EntryCountError(f"subspaces has {len(subspaces)} entries for {n} interventions; give one entry "
                             f"(None or a list of index lists, one per example) per intervention")
        return list(subspaces)
    return [subspaces] * n  # custom metadata (e.g. a dict) goes to every intervention untouched
