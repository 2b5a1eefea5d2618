"""The package's import structure, read from the source with `ast` (nothing is imported).

Why: lazy imports inside functions hide cycles and upward dependencies from Python itself (the import succeeds
because it runs late), so the layering is checked here instead. Every import of a hookvene module counts, lazy or
not; an import of a module name built at run time (`importlib.import_module(f"...")`) cannot be seen.
"""

import ast
from collections import deque
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hookvene"

# Lowest first. A module may import modules of its own or a lower layer; "x.*" is every module under package x.
# Layer 0, the foundation, imports nothing from hookvene at all.
LAYERS = [
    ["hookvene.hooks", "hookvene.utils", "hookvene.viz", "hookvene.factored_matrix", "hookvene.causal_model",
     "hookvene.distributed"],
    ["hookvene.cache", "hookvene.lens", "hookvene.sae", "hookvene.sae_training"],
    ["hookvene.models", "hookvene.models.*"],
    ["hookvene.loading", "hookvene.loading.*"],
    ["hookvene.create"],
    ["hookvene.interventions"],
    ["hookvene.config"],
    ["hookvene.components"],
    ["hookvene.locations"],
    ["hookvene.plan"],
    ["hookvene.generate"],
    ["hookvene.serialization"],
    ["hookvene.intervenable"],
    ["hookvene.collect"],
    ["hookvene.experiments", "hookvene.experiments.*"],
    ["hookvene.cli", "hookvene.__main__"],
    ["hookvene"],
]


def layer_of(module: str) -> int | None:
    for layer, patterns in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return layer
    return None


def is_private(name: str) -> bool:
    """`_x` is private; dunders (`__init__`, `__version__`) are not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports_of(module: str, source: str, modules: set[str]) -> dict[str, set[str]]:
    """{imported hookvene module: names imported from it} for every import statement in `source`, at any depth.

    `from a import b` imports the submodule a.b when there is one, else the name b from module a. Relative imports
    are resolved against the module's package (a module is a package if other modules live under it)."""
    is_package = any(m.startswith(module + ".") for m in modules)
    package = module if is_package else module.rpartition(".")[0]
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    found.setdefault(f"{base}.{alias.name}", set())
                else:
                    found.setdefault(base, set()).add(alias.name)
    return {m: names for m, names in found.items() if m.split(".")[0] == "hookvene" and m != module}


def shortest_cycle(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """The shortest path start -> ... -> start (breadth-first, neighbours in sorted order), or None."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                path = [node]  # walk back: node, its parent, ..., start
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """For every module on a cycle, the shortest cycle through it: each cycle once, starting at its smallest name,
    shortest first."""
    cycles = []
    for module in sorted(graph):
        cycle = shortest_cycle(module, graph)
        if cycle is None:
            continue
        ring = cycle[:-1]
        i = ring.index(min(ring))
        ring = ring[i:] + ring[:i]
        if ring + ring[:1] not in cycles:
            cycles.append(ring + ring[:1])
    return sorted(cycles, key=lambda c: (len(c), c))


def check_layering(sources: dict[str, str]) -> list[str]:
    """Every violation in {module name: source}: import cycles, imports of a higher layer (or by the foundation),
    imports of private names or of private modules from outside their package, and modules not in LAYERS."""
    modules = set(sources)
    graph = {m: imports_of(m, src, modules) for m, src in sorted(sources.items())}
    problems = [f"cycle: {' -> '.join(c)}" for c in find_cycles({m: set(t) for m, t in graph.items()})]
    unplaced = sorted(m for m in modules | {t for ts in graph.values() for t in ts} if layer_of(m) is None)
    problems += [f"{m}: not in the layering (add it to LAYERS in tests/test_layering.py)" for m in unplaced]
    for module, targets in graph.items():
        for target, names in sorted(targets.items()):
            mine, theirs = layer_of(module), layer_of(target)
            if mine == 0 and theirs is not None:
                problems.append(f"{module} -> {target}: layer 0 imports layer {theirs} "
                                "(the foundation imports nothing from hookvene)")
            elif mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{module} -> {target}: layer {mine} imports layer {theirs}")
            parts = target.split(".")
            for i, part in enumerate(parts):  # a private module is private to the package that holds it
                if is_private(part) and not module.startswith(".".join(parts[:i]) + "."):
                    problems.append(f"{module} -> {target}: imports a private module")
                    break
            for name in sorted(filter(is_private, names)):  # a private name is private to its module
                problems.append(f"{module} -> {target}: imports the private name {name}")
    return problems


def package_sources() -> dict[str, str]:
    sources = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        sources[name] = path.read_text()
    return sources


# -- the checker on made-up packages: it does catch each kind of violation ----------------------------------------


def test_checker_accepts_a_clean_package():
    sources = {
        "hookvene": "from hookvene import models\nfrom hookvene.cli import main\n",
        "hookvene.cli": "def main():\n    from hookvene.models import GPT2\n",
        "hookvene.models": "from hookvene.models.gpt2 import GPT2\n",
        "hookvene.models.gpt2": "from hookvene.hooks import HookPoint\nfrom . import _common\n",  # own package
        "hookvene.models._common": "",
        "hookvene.hooks": "import torch\n",
    }
    assert check_layering(sources) == []


def test_checker_reports_an_upward_import_even_inside_a_function():
    sources = {"hookvene.hooks": "def generate(*a):\n    from hookvene.generate import generate\n",
               "hookvene.generate": "import torch\n",
               "hookvene.loading.gpt2": "import hookvene.experiments.metrics\n",
               "hookvene.experiments.metrics": ""}
    assert check_layering(sources) == [
        f"hookvene.hooks -> hookvene.generate: layer 0 imports layer {layer_of('hookvene.generate')} (the "
        f"foundation imports nothing from hookvene)",
        f"hookvene.loading.gpt2 -> hookvene.experiments.metrics: layer {layer_of('hookvene.loading.gpt2')} imports "
        f"layer {layer_of('hookvene.experiments.metrics')}",
    ]


def test_checker_reports_a_foundation_module_importing_another():
    """Layer 0 imports nothing from hookvene, not even from layer 0 (elsewhere same-layer imports are fine)."""
    assert check_layering({"hookvene.utils": "from hookvene.hooks import HookPoint\n", "hookvene.hooks": ""}) == [
        "hookvene.utils -> hookvene.hooks: layer 0 imports layer 0 (the foundation imports nothing from hookvene)"]


def test_checker_reports_cycles_with_their_path():
    sources = {
        "hookvene.loading.common": "from . import gpt2\n",  # relative, and a submodule imported by name
        "hookvene.loading.gpt2": "def f():\n    import hookvene.loading.common\n",
        "hookvene.experiments.a": "from hookvene.experiments.b import x\n",
        "hookvene.experiments.b": "from hookvene.experiments.c import y\n",
        "hookvene.experiments.c": "from ..experiments import a\n",
    }
    assert check_layering(sources) == [
        "cycle: hookvene.loading.common -> hookvene.loading.gpt2 -> hookvene.loading.common",
        "cycle: hookvene.experiments.a -> hookvene.experiments.b -> hookvene.experiments.c -> hookvene.experiments.a",
    ]


def test_checker_reports_private_names_and_modules():
    sources = {
        "hookvene.create": "from hookvene.models.gpt2 import GPT2, _helper\n",
        "hookvene.generate": "from hookvene.models import _common\nimport hookvene.models._common\n",
        "hookvene.models.gpt2": "from hookvene.models._common import KVCache\n",  # same package: allowed
        "hookvene.models._common": "",
        "hookvene.models": "from hookvene.models.gpt2 import __doc__\n",  # a dunder is not private
    }
    assert check_layering(sources) == [
        "hookvene.create -> hookvene.models.gpt2: imports the private name _helper",
        "hookvene.generate -> hookvene.models._common: imports a private module",
    ]


def test_checker_names_modules_missing_from_the_layering():
    assert check_layering({"hookvene.newthing": "", "hookvene.cli": "from hookvene.other import x\n"}) == [
        "hookvene.newthing: not in the layering (add it to LAYERS in tests/test_layering.py)",
        "hookvene.other: not in the layering (add it to LAYERS in tests/test_layering.py)",
    ]


# -- the real package ---------------------------------------------------------------------------------------------


def test_package_sources_are_found():
    sources = package_sources()
    assert {"hookvene", "hookvene.hooks", "hookvene.models", "hookvene.cli", "hookvene.__main__"} <= set(sources)
    assert "hookvene.models.gpt2" in imports_of("hookvene.models", sources["hookvene.models"], set(sources))


def test_package_layering():
    problems = check_layering(package_sources())
    assert not problems, "\n" + "\n".join(problems)
