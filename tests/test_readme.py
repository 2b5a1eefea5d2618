"""The README's tour runs as written (on the bundled model, offline)."""

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_tour_runs():
    text = open(README).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - the README is ours
    assert scope["logits"].shape[-1] == scope["model"].cfg.d_vocab
    assert scope["patched"].logits.shape == scope["logits"].shape
    assert not scope["model"].has_hooks()


def test_readme_plan_block_runs():
    """The Layout section's plan-and-attach block: the interchange changes the logits, and nothing stays attached."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
                 if "from hookvene.plan import" in b)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README is ours
    model = scope["model"]
    assert not model.has_hooks()
    assert (scope["logits"] - model(scope["base_ids"]).logits).abs().max() > 1e-3
