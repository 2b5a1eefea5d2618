"""Generation with interventions: `IntervenableModel.generate`, on top of `hookvene.plan` and the models' own
KV-cached decoding (`model.generate`, in `hookvene/models/common.py`). Hooks fire on every forward pass: first the
prompt pass (hook tensors cover the whole prompt), then one pass per new token (hook tensors cover only that token,
`pos` = 1: the KV cache holds the rest).

When interventions apply:

    intervene_on_prompt=True       the prompt pass is intervened, at `unit_locations` (prompt positions, absolute
                                   indices into the padded prompt) or, with unit_locations=None, at every position
    intervene_on_generated=True    every decode pass is intervened on its one new position (default: True when
                                   unit_locations is None, i.e. "every position of every step": steering)
    generated_steps=[0, 3]         restrict the decode passes intervened (0 = the pass that reads the first new token)

pyvene's default (intervene_on_prompt=False) leaves the first generated token unaffected; hookvene's default
(True) does not. Interventions that read a source run (interchange) act on prompt positions only.
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import nn

from hookvene.models.common import generate
from hookvene.plan import Plan, Slot, make_plan
from hookvene.utils import as_inputs


def intervened_generate(model: nn.Module, slots: Sequence[Slot], base: Any, *, mode: str = "parallel",
                        sources: Any = None, unit_locations: Any = None, source_representations: Any = None,
                        intervene_on_prompt: bool = True, intervene_on_generated: bool | None = None,
                        generated_steps: list[int] | None = None, subspaces: Any = None,
                        output_original_output: bool = False, **kwargs: Any) -> tuple[Any, Any]:
    """Decode with the interventions of `slots` (an IntervenableModel's); returns `(original ids or None,
    intervened ids)`, or with a Collect intervention `((original, collected activations), intervened ids)`. See
    the module docstring for when interventions apply; `**kwargs` go to the model's `generate` (max_new_tokens,
    max_length, do_sample, temperature, ...)."""
    base = as_inputs(base)
    input_ids, mask = base["input_ids"], base.get("attention_mask")
    if intervene_on_generated is None:
        intervene_on_generated = unit_locations is None
    prompt = make_plan(slots, base, sources=sources, unit_locations=unit_locations, subspaces=subspaces,
                       source_representations=source_representations, mode=mode)
    _check_when(prompt, input_ids.shape[1], unit_locations, intervene_on_prompt, intervene_on_generated,
                generated_steps, kwargs)
    prompt.read_sources(model)
    step = None
    if intervene_on_generated:
        needs_run = [s.key for s, p in zip(prompt.slots, prompt.slot_plans) if p.feed == "run"]
        if needs_run:
            raise ValueError(f"interventions {needs_run} read a source run, which only has prompt positions; pass "
                             f"intervene_on_generated=False (prompt only) or source_representations=")
        step = make_plan(slots, {"input_ids": input_ids[:, :1]}, subspaces=subspaces,
                         source_representations=source_representations, collected=prompt.collected_by_key)

    def around(k: int) -> AbstractContextManager:
        if k == 0:
            return prompt.attached(model) if intervene_on_prompt else nullcontext()
        wanted = step is not None and (generated_steps is None or k - 1 in generated_steps)
        return step.attached(model) if wanted else nullcontext()

    original = generate(model, input_ids, mask, **kwargs) if output_original_output else None
    ids = generate(model, input_ids, mask, around=around, **kwargs)
    return ((original, prompt.collected()), ids) if prompt.has_collect() else (original, ids)


def _check_when(plan: Plan, prompt_len: int, unit_locations: Any, on_prompt: bool, on_generated: bool,
                steps: list[int] | None, kwargs: dict[str, Any]) -> None:
    """Refuse settings under which an intervention would silently never apply."""
    for slot, p in zip(plan.slots, plan.slot_plans):
        if p.base_sel is not None and slot.rep.unit in ("pos", "h.pos"):
            top = max((i for row in p.base_sel.levels[-1] for i in row), default=0)
            if top >= prompt_len:
                raise ValueError(f"intervention {slot.key}: position {top} is past the {prompt_len}-token prompt; "
                                 f"unit_locations name prompt positions")
    if unit_locations is not None and not on_prompt and not on_generated:
        raise ValueError("unit_locations name prompt positions, but intervene_on_prompt=False and "
                         "intervene_on_generated=False: nothing would be intervened (to intervene on every new token "
                         "instead, drop unit_locations or pass intervene_on_generated=True)")
    if steps is not None:
        if not on_generated:
            raise ValueError("generated_steps needs intervene_on_generated=True")
        n_new = kwargs.get("max_new_tokens") or (kwargs.get("max_length") or 0) - prompt_len
        bad = [t for t in steps if not 0 <= t < max(n_new - 1, 0)]
        if bad:
            raise ValueError(f"generated_steps {bad} never happen: decode passes are numbered 0..{n_new - 2} "
                             f"(pass k reads generated token k)")
