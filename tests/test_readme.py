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
