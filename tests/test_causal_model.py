"""CausalModel: structure, runs, interchanges, sampling and datasets on small graphs whose answers are known."""

import random

import pytest
import torch

import hookvene as pv


def and_model():
    return pv.CausalModel(["C", "A", "B"], {v: [False, True] for v in "ABC"}, {"A": [], "B": [], "C": ["A", "B"]},
                          {"A": lambda: True, "B": lambda: True, "C": lambda a, b: a and b})


def chain():
    """X, Y inputs; S = X + Y (intermediate); O = S > 1 (output)."""
    return pv.CausalModel(["X", "Y", "S", "O"], {"X": [0, 1], "Y": [0, 1], "S": [0, 1, 2], "O": [False, True]},
                          {"X": [], "Y": [], "S": ["X", "Y"], "O": ["S"]},
                          {"X": lambda: 0, "Y": lambda: 0, "S": lambda x, y: x + y, "O": lambda s: s > 1})


def test_structure_timesteps_and_equivalence_classes():
    m = and_model()
    assert m.inputs == ["A", "B"] and m.outputs == ["C"] and m.timesteps == {"A": 0, "B": 0, "C": 1}
    assert m.equiv_classes == {"C": {False: [{"A": False, "B": False}, {"A": False, "B": True},
                                             {"A": True, "B": False}], True: [{"A": True, "B": True}]}}
    c = chain()
    assert c.timesteps == {"X": 0, "Y": 0, "S": 1, "O": 2} and c.variables[-1] == "O"


def test_run_forward_and_interchange():
    m = and_model()
    assert m.run_forward() == {"A": True, "B": True, "C": True}
    assert m.run_forward({"A": True, "B": False})["C"] is False
    assert m.run_forward({"A": False, "B": False, "C": True})["C"] is True  # an intervention on the output
    assert m.run_interchange({"A": True, "B": False}, {"B": {"A": False, "B": True}})["C"] is True
    c = chain()
    assert c.run_interchange({"X": 0, "Y": 0}, {"S": {"X": 1, "Y": 1}}) == {"X": 0, "Y": 0, "S": 2, "O": True}


def test_bad_graphs_are_refused_with_clear_errors():
    with pytest.raises(ValueError, match="takes 1 arguments but 'C' has 2 parents"):
        pv.CausalModel(["A", "B", "C"], {v: [0] for v in "ABC"}, {"A": [], "B": [], "C": ["A", "B"]},
                       {"A": lambda: 0, "B": lambda: 0, "C": lambda a: a})
    with pytest.raises(ValueError, match="variable 'B' has no entry in functions"):
        pv.CausalModel(["A", "B"], {"A": [0], "B": [0]}, {"A": [], "B": ["A"]}, {"A": lambda: 0})
    with pytest.raises(ValueError, match="returned 2, which is not among its values"):
        pv.CausalModel(["A", "B"], {"A": [1], "B": [0, 1]}, {"A": [], "B": ["A"]},
                       {"A": lambda: 1, "B": lambda a: a + 1})


def test_sampling():
    random.seed(0)
    m = and_model()
    outs = [m.run_forward(m.sample_input_tree_balanced())["C"] for _ in range(400)]
    assert 150 < sum(outs) < 250  # balanced over C, although only 1 of 4 inputs gives True
    assert all(m.run_forward(m.sample_input(mandatory=lambda t: t["C"]))["C"] for _ in range(20))
    c = chain()
    for _ in range(20):
        assert set(c.sample_intervention()) == {"S"}
    with pytest.raises(ValueError, match="no intermediate variables"):
        m.sample_intervention()


def test_factual_and_counterfactual_datasets():
    random.seed(0)
    c = chain()
    data = c.generate_factual_dataset(5, sampler=lambda: {"X": 1, "Y": 1})
    assert torch.equal(data[0]["input_ids"], torch.tensor([1.0, 1.0])) and torch.equal(data[0]["labels"],
                                                                                          torch.tensor([1.0]))
    cf = c.generate_counterfactual_dataset(4, intervention_id=lambda iv: 7, batch_size=2,
                                           intervention_sampler=lambda: {"S": 2}, return_tensors=False)
    assert len(cf) == 4
    for ex in cf:
        assert c.run_forward(ex["source_input_ids"][0])["S"] == 2  # a source that gives S its value
        assert ex["labels"]["O"] is True and ex["intervention_id"] == [7]
        assert ex["base_labels"] == c.run_forward(ex["input_ids"])
    tensors = c.generate_counterfactual_dataset(2, intervention_id=lambda iv: 0, batch_size=1,
                                                intervention_sampler=lambda: {"S": 0})
    assert tensors[0]["source_input_ids"].shape == (1, 2) and tensors[0]["labels"].tolist() == [0.0]


def test_live_paths_and_filters():
    m = and_model()
    paths = m.find_live_paths({"A": True, "B": True})
    assert sorted(paths[2]) == [["A", "C"], ["B", "C"]]
    assert m.get_specific_path_filter("A", "C")({"A": True, "B": True, "C": True})
    assert not m.get_specific_path_filter("A", "C")({"A": False, "B": False, "C": False})  # B=F masks A
    assert m.get_partial_filter({"A": True})({"A": True, "B": False})
