"""pyvene's `CausalModel`: a small deterministic causal graph over named variables, used to generate the factual
and counterfactual datasets that interchange intervention training (IIT) and DAS align a network with.

    model = CausalModel(["A", "B", "C"], {v: [False, True] for v in "ABC"},
                        parents={"A": [], "B": [], "C": ["A", "B"]},
                        functions={"A": lambda: True, "B": lambda: True, "C": lambda a, b: a and b})
    model.run_forward({"A": True, "B": False})                       # {"A": True, "B": False, "C": False}
    model.run_interchange({"A": True, "B": False}, {"B": {"A": False, "B": True}})["C"]   # True

Variables without parents are the inputs, variables that are nobody's parent the outputs, the rest intermediate.
Each variable's function takes its parents' values in `parents` order. Same names and arguments as pyvene; where
pyvene asserts, this module raises ValueError naming the problem. Sampling uses Python's `random` module (seed it
with `random.seed` or `hookvene.set_seed` for repeatable datasets).
"""

import inspect
import itertools
import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch

Setting = dict[str, Any]  # variable -> value


class CausalModel:
    """A causal graph: `variables`, their possible `values`, `parents` and `functions` (see the module docstring).

    Args:
        timesteps: variable -> time step (each child later than its parents); default: inputs at 0, every other
            variable one step after its latest parent, and all outputs at the last step.
        equiv_classes: variable -> {value: [parent settings producing it]}; default: enumerated from the functions.
        pos: variable -> (x, y) for `print_structure`; default: by time step.
    """

    def __init__(self, variables: Sequence[str], values: Mapping[str, Sequence[Any]],
                 parents: Mapping[str, Sequence[str]], functions: Mapping[str, Callable[..., Any]],
                 timesteps: Mapping[str, int] | None = None, equiv_classes: dict | None = None,
                 pos: Mapping[str, tuple[float, float]] | None = None) -> None:
        self.values = dict(values)
        self.parents = {v: list(p) for v, p in parents.items()}
        self.functions = dict(functions)
        names = sorted(variables)
        for var in names:
            for what, table in (("values", self.values), ("parents", self.parents), ("functions", self.functions)):
                if var not in table:
                    raise ValueError(f"variable {var!r} has no entry in {what}")
            unknown = [p for p in self.parents[var] if p not in names]
            if unknown:
                raise ValueError(f"variable {var!r} has parents {unknown} that are not variables ({names})")
            arity = len(inspect.signature(self.functions[var]).parameters)
            if arity != len(self.parents[var]):
                raise ValueError(f"the function of {var!r} takes {arity} arguments but {var!r} has "
                                 f"{len(self.parents[var])} parents {self.parents[var]}")
        self.children = {v: [c for c in names if v in self.parents[c]] for v in names}
        self.inputs = [v for v in names if not self.parents[v]]
        self.outputs = [v for v in names if not self.children[v]]
        self.timesteps = dict(timesteps) if timesteps is not None else self._default_timesteps(names)
        for var in names:
            late = [p for p in self.parents[var] if self.timesteps[p] >= self.timesteps[var]]
            if late:
                raise ValueError(f"timesteps: {var!r} (step {self.timesteps[var]}) must come after its parents {late}")
        self.end_time = max(self.timesteps.values(), default=0)
        self.variables = sorted(names, key=lambda v: self.timesteps[v])  # an order in which parents come first
        self.pos = dict(pos) if pos is not None else self._default_pos()
        self.equiv_classes: dict[str, dict[Hashable, list[Setting]]] = dict(equiv_classes or {})
        self.generate_equiv_classes(keep=True)

    def _default_timesteps(self, names: list[str]) -> dict[str, int]:
        steps: dict[str, int] = {}

        def step(var: str, seen: tuple[str, ...] = ()) -> int:
            if var in seen:
                raise ValueError(f"the graph has a cycle through {var!r}: {' -> '.join(seen + (var,))}")
            if var not in steps:
                steps[var] = 1 + max((step(p, seen + (var,)) for p in self.parents[var]), default=-1)
            return steps[var]

        for v in names:
            step(v)
        end = max(steps.values(), default=0)
        return {v: (end if v in self.outputs else s) for v, s in steps.items()}

    def _default_pos(self) -> dict[str, tuple[float, float]]:
        width: dict[int, int] = {}
        pos = {}
        for v in self.variables:
            t = self.timesteps[v]
            pos[v] = (width.get(t, 0), t)
            width[t] = width.get(t, 0) + 1
        return pos

    def generate_equiv_classes(self, keep: bool = False) -> None:
        """For every non-input variable: {value: [parent settings whose function gives that value]}. With `keep`,
        classes given to the constructor are left as they are."""
        for var in self.variables:
            if var in self.inputs or (keep and var in self.equiv_classes):
                continue
            classes: dict[Hashable, list[Setting]] = {val: [] for val in self.values[var]}
            for combo in itertools.product(*(self.values[p] for p in self.parents[var])):
                value = self.functions[var](*combo)
                if value not in classes:
                    raise ValueError(f"the function of {var!r} returned {value!r}, which is not among its values "
                                     f"{self.values[var]}")
                classes[value].append(dict(zip(self.parents[var], combo)))
            self.equiv_classes[var] = classes

    # -- running --------------------------------------------------------------------------------------------------

    def run_forward(self, intervention: Mapping[str, Any] | None = None) -> Setting:
        """Every variable's value, parents first; a variable named in `intervention` takes the given value instead
        of its function's (inputs included: an input setting is an intervention on the inputs)."""
        intervention = intervention or {}
        setting: Setting = {}
        for var in self.variables:
            if var in intervention:
                setting[var] = intervention[var]
            else:
                setting[var] = self.functions[var](*(setting[p] for p in self.parents[var]))
        return setting

    def run_interchange(self, input: Mapping[str, Any],
                        source_interventions: Mapping[str, Mapping[str, Any]]) -> Setting:
        """Run `input` with each variable of `source_interventions` fixed to the value it takes on its own source
        input: the counterfactual an interchange intervention should produce."""
        setting = dict(input)
        for var, source in source_interventions.items():
            setting[var] = self.run_forward(source)[var]
        return self.run_forward(setting)

    # -- sampling -------------------------------------------------------------------------------------------------

    def sample_input(self, mandatory: Callable[[Setting], bool] | None = None, max_tries: int = 100_000) -> Setting:
        """A random input setting; with `mandatory`, one whose full run satisfies it."""
        for _ in range(max_tries):
            setting = {v: random.choice(list(self.values[v])) for v in self.inputs}
            if mandatory is None or mandatory(self.run_forward(setting)):
                return setting
        raise ValueError(f"no input satisfying `mandatory` found in {max_tries} random draws")

    def sample_intervention(self, mandatory: Callable[[Setting], bool] | None = None) -> Setting:
        """A random non-empty intervention on intermediate variables (each included with probability 1/2)."""
        middle = [v for v in self.variables if v not in self.inputs and v not in self.outputs]
        if not middle:
            raise ValueError("the model has no intermediate variables to intervene on; pass intervention_sampler")
        while True:
            chosen = {v: random.choice(list(self.values[v])) for v in middle if random.random() < 0.5}
            if chosen and (mandatory is None or mandatory(chosen)):
                return chosen

    def sample_input_tree_balanced(self, output_var: str | None = None, output_var_value: Any = None) -> Setting:
        """An input setting drawn top-down so that `output_var`'s value is uniform over its values (or equals
        `output_var_value`): pick the value, then a parent setting from its equivalence class, recursively."""
        if output_var is None:
            if len(self.outputs) != 1:
                raise ValueError(f"the model has outputs {self.outputs}: name output_var")
            output_var = self.outputs[0]
        if output_var_value is None:
            output_var_value = random.choice(list(self.values[output_var]))
        setting: Setting = {}

        def fill(var: str, value: Any) -> None:
            if var in self.inputs:
                setting[var] = value
                return
            options = self.equiv_classes[var][value]
            if not options:
                raise ValueError(f"no parent setting gives {var}={value!r}")
            for parent, parent_value in random.choice(options).items():
                fill(parent, parent_value)

        fill(output_var, output_var_value)
        for var in self.inputs:
            setting.setdefault(var, random.choice(list(self.values[var])))
        return setting

    # -- live paths and filters -----------------------------------------------------------------------------------

    def find_live_paths(self, intervention: Mapping[str, Any]) -> dict[int, list[list[str]]]:
        """{length: paths}: chains parent -> child along which changing the parent (alone) changes the child in
        the run of `intervention`, by length (2 = one edge)."""
        actual = self.run_forward(intervention)
        paths = {1: [[v] for v in self.variables]}
        length = 2
        while True:
            paths[length] = []
            for path in paths[length - 1]:
                for child in self.children[path[-1]]:
                    if any(self.run_forward({**intervention, path[-1]: value})[child] != actual[child]
                           for value in self.values[path[-1]]):
                        paths[length].append(path + [child])
            if not paths[length]:
                break
            length += 1
        del paths[1]
        return paths

    def get_path_maxlen_filter(self, lengths: Sequence[int]) -> Callable[[Setting], bool]:
        """A filter: the longest live path of the setting's inputs has one of `lengths`."""
        def check(setting: Setting) -> bool:
            paths = self.find_live_paths({v: setting[v] for v in self.inputs})
            return max((n for n, p in paths.items() if p), default=1) in lengths
        return check

    def get_partial_filter(self, partial_setting: Mapping[str, Any]) -> Callable[[Setting], bool]:
        """A filter: the setting agrees with `partial_setting`."""
        return lambda setting: all(setting[v] == value for v, value in partial_setting.items())

    def get_specific_path_filter(self, start: str, end: str) -> Callable[[Setting], bool]:
        """A filter: some live path of the setting's inputs runs from `start` to `end`."""
        def check(setting: Setting) -> bool:
            paths = self.find_live_paths({v: setting[v] for v in self.inputs})
            return any(p[0] == start and p[-1] == end for ps in paths.values() for p in ps)
        return check

    # -- datasets -------------------------------------------------------------------------------------------------

    def input_to_tensor(self, setting: Mapping[str, Any]) -> torch.Tensor:
        """The inputs' values, in `inputs` order, as one float vector (vector-valued inputs are concatenated)."""
        return torch.cat([torch.tensor(setting[v]).float().reshape(-1) for v in self.inputs])

    def output_to_tensor(self, setting: Mapping[str, Any]) -> torch.Tensor:
        """The outputs' values, in `outputs` order, as one float vector."""
        return torch.cat([torch.tensor(float(setting[v])).reshape(-1) for v in self.outputs])

    def generate_factual_dataset(self, size: int, sampler: Callable[..., Setting] | None = None,
                                 filter: Callable[[Setting], bool] | None = None, device: str = "cpu",
                                 input_function: Callable | None = None, output_function: Callable | None = None,
                                 return_tensors: bool = True) -> list[dict[str, Any]]:
        """`size` examples {"input_ids": input, "labels": the full run}, as tensors (`input_function` /
        `output_function`, default `input_to_tensor` / `output_to_tensor`) or as settings."""
        sampler = sampler or self.sample_input
        to_in, to_out = input_function or self.input_to_tensor, output_function or self.output_to_tensor
        examples = []
        while len(examples) < size:
            setting = sampler()
            if filter is not None and not filter(setting):
                continue
            run = self.run_forward(setting)
            if return_tensors:
                examples.append({"input_ids": to_in(setting).to(device), "labels": to_out(run).to(device)})
            else:
                examples.append({"input_ids": setting, "labels": run})
        return examples

    def generate_counterfactual_dataset(self, size: int, intervention_id: Callable[[Setting], int], batch_size: int,
                                        sampler: Callable[..., Setting] | None = None,
                                        intervention_sampler: Callable[..., Setting] | None = None,
                                        filter: Callable[[Setting], bool] | None = None, device: str = "cpu",
                                        input_function: Callable | None = None,
                                        output_function: Callable | None = None,
                                        return_tensors: bool = True) -> list[dict[str, Any]]:
        """Interchange-intervention examples, `batch_size` per sampled intervention (so every batch of a loader
        over the list shares one intervention), until there are at least `size`.

        Each example: "input_ids" (the base input), "source_input_ids" (one source input per intervened variable,
        in variable order, padded with zeros / {} to the number of intermediate variables), "labels" (the run of
        the base with each intervened variable taken from its source), "base_labels" (the plain base run) and
        "intervention_id" ([intervention_id(intervention)]). A source for variable V with value x is drawn as
        `sampler(output_var=V, output_var_value=x)` when `sampler` is given (e.g. `sample_input_tree_balanced`),
        else as a random input whose run has V = x.
        """
        to_in, to_out = input_function or self.input_to_tensor, output_function or self.output_to_tensor
        intervention_sampler = intervention_sampler or self.sample_intervention
        base_sampler = sampler or self.sample_input

        def source_for(var: str, value: Any) -> Setting:
            if sampler is not None:
                return sampler(output_var=var, output_var_value=value)
            return self.sample_input(mandatory=lambda run: run[var] == value)

        width = len([v for v in self.variables if v not in self.inputs and v not in self.outputs])
        examples: list[dict[str, Any]] = []
        while len(examples) < size:
            intervention = intervention_sampler()
            if filter is not None and not filter(intervention):
                continue
            for _ in range(batch_size):
                base = base_sampler()
                sources = {v: source_for(v, intervention[v]) for v in self.variables if v in intervention}
                padded: list[Any] = list(sources.values())
                labels, base_labels = self.run_interchange(base, sources), self.run_forward(base)
                if return_tensors:
                    padded = [to_in(s) for s in padded]
                    padded += [torch.zeros_like(to_in(base))] * (width - len(padded))
                    examples.append({"input_ids": to_in(base).to(device),
                                     "source_input_ids": torch.stack(padded).to(device),
                                     "labels": to_out(labels).to(device), "base_labels": to_out(base_labels).to(device),
                                     "intervention_id": torch.tensor([intervention_id(intervention)]).to(device)})
                else:
                    padded += [{} for _ in range(width - len(padded))]
                    examples.append({"input_ids": base, "source_input_ids": padded, "labels": labels,
                                     "base_labels": base_labels, "intervention_id": [intervention_id(intervention)]})
        return examples

    # -- drawing --------------------------------------------------------------------------------------------------

    def print_structure(self, pos: Mapping[str, tuple[float, float]] | None = None) -> None:
        """Draw the graph (needs networkx and matplotlib, which hookvene does not depend on)."""
        try:
            import matplotlib.pyplot as plt
            import networkx as nx
        except ImportError as e:
            raise ImportError(f"print_structure needs networkx and matplotlib ({e}); pip install networkx "
                              f"matplotlib") from None
        graph = nx.DiGraph([(p, c) for c in self.variables for p in self.parents[c]])
        graph.add_nodes_from(self.variables)
        plt.figure(figsize=(10, 10))
        nx.draw_networkx(graph, with_labels=True, node_color="green", pos=dict(pos or self.pos))
        plt.show()
