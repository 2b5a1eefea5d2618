"""Tests written for mutants of hookvene/locations.py that survived tests/test_plan.py and tests/test_intervenable.py
(mutation/REPORT.md): shortcut parsing at its edges (empty and one-element lists, None on one side), index tensors on
the input's device and of integer dtype even for zero units, time-step rows, and the exact range errors.
"""

import pytest
import torch

from hookvene.locations import (
    GET_LOC,
    EntryCountError,
    Selection,
    expand_side,
    make_selection,
    parse_pair,
    parse_subspaces,
)


def test_get_loc_builds_h_pos_only():
    assert GET_LOC((2, 3), batch_size=2) == [[[[2], [2]], [[3], [3]]]]
    with pytest.raises(ValueError, match=r"^GET_LOC builds 'h.pos' locations only, got unit='pos'$"):
        GET_LOC((2, 3), unit="pos")


def test_shortcut_edges():
    assert expand_side([3], 1, 2) == [[[3], [3]]]  # a one-element flat list is one unit
    assert expand_side(None, 2, 1) == [None, None]
    assert parse_pair((None, 3), 1, 2, False) == ([None], [[[3], [3]]])
    with pytest.raises(EntryCountError, match=r"^unit locations \[\] have 0 entries for 1 interventions"):
        expand_side([], 1, 2)  # empty: not a flat list of ints
    with pytest.raises(ValueError, match=r"^cannot read unit locations 'x': expected an int, a flat list of ints, or a "
                                         r"list with one entry per intervention \(2\)$"):
        expand_side("x", 2, 1)


def test_index_tensors_on_the_device_and_long_even_for_zero_units():
    sel = Selection([[[0, 1], [1, 0]], [[2], [3]]])
    idx = sel.index(torch.device("meta"))
    assert all(t.device.type == "meta" and t.dtype == torch.long for t in idx)
    empty = Selection([[[], []]]).index(torch.device("cpu"))
    assert all(t.dtype == torch.long for t in empty) and empty[1].shape == (2, 0)
    x = torch.arange(12.0).view(2, 6)
    assert x[empty].shape == (2, 0)


def test_step_rows():
    sel = Selection([[[0, 2], [2], [1]]])
    assert sel.step_rows(2) == [(0, 1), (1, 0)]
    assert sel.step_rows(1) == [(2, 0)]
    assert sel.step_rows(5) == []


def test_check_errors_name_the_bad_index():
    sel = Selection([[[0, 3]]])
    with pytest.raises(ValueError, match=r"^x: position index 3 is out of range; this tensor has 3 positions "
                                         r"\(shape \(1, 3, 4\)\)$"):
        sel.check((1, 3, 4), (1,), "x", ("position",))
    with pytest.raises(ValueError, match=r"^x: position index -1 is out of range"):
        Selection([[[-1, 1]]]).check((1, 3, 4), (1,), "x", ("position",))
    with pytest.raises(ValueError, match=r"^x: unit_locations have 1 rows but the batch has 3 examples$"):
        sel.check((3, 5, 4), (1,), "x", ("position",))
    Selection([[[], []]]).check((2, 1, 4), (1,), "x", ("position",))  # zero units: nothing out of range


def test_make_selection_errors():
    with pytest.raises(ValueError, match=r"^x: 'h.pos' locations must be \[heads per example, positions per example\], "
                                         r"got \[\[\[0\]\]\]$"):
        make_selection([[[0]]], "h.pos", 1, "x")
    with pytest.raises(ValueError, match=r"^x: expected one list of unit indices per example, got \[3, 4\]$"):
        make_selection([3, 4], "pos", 2, "x")
    assert make_selection([[[1]], [[2]]], "h.pos", 1, "x").levels == [[[1]], [[2]]]
    with pytest.raises(ValueError, match=r"^x: every example must select the same number of units, got "
                                         r"\[\[0\], \[1, 2\]\]$"):
        make_selection([[0], [1, 2]], "pos", 2, "x")
    with pytest.raises(ValueError, match=r"^x: unit indices must be ints, got \[\[0.5\]\]$"):
        make_selection([[0.5]], "pos", 1, "x")


def test_custom_subspace_metadata_goes_to_every_intervention():
    meta = {"features": [1, 2]}
    assert parse_subspaces(meta, 2, 3) == [meta, meta]
