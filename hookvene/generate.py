"""Generation with a KV cache, for hooked models and for IntervenableModel.

`generate(model, input_ids, ...)` is greedy or sampled decoding for a causal LM (GPT-2, GPT-Neo) or the decoder of
T5. Hooks attached with `model.hooks(...)` fire on every forward pass: first the prompt pass (hook tensors cover the
whole prompt), then one pass per new token (hook tensors cover only that token, `pos` = 1: the KV cache holds the
rest). Left-padded batches get position ids counted from each row's first real token, as `transformers` does.

When IntervenableModel interventions apply (`intervened_generate`):

    intervene_on_prompt=True       the prompt pass is intervened, at `unit_locations` (prompt positions, absolute
                                   indices into the padded prompt) or, with unit_locations=None, at every position
    intervene_on_generated=True    every decode pass is intervened on its one new position (default: True when
                                   unit_locations is None, i.e. "every position of every step": steering)
    generated_steps=[0, 3]         restrict the decode passes intervened (0 = the pass that reads the first new token)

pyvene's default (intervene_on_prompt=False) leaves the first generated token unaffected; hookvene's default
(True) does not. Interventions that read a source run (interchange) act on prompt positions only.
"""

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from hookvene.models._common import KVCache


def _is_encoder_decoder(model: nn.Module) -> bool:
    return "decoder_input_ids" in inspect.signature(model.forward).parameters


def _check_generative(model: nn.Module) -> None:
    params = inspect.signature(model.forward).parameters
    if "past_key_values" not in params or getattr(model, "hook_logits", None) is None:
        raise ValueError(f"{type(model).__name__} cannot generate: generation needs a causal LM with an LM head "
                         f"(GPT2LM, GPTNeoLM) or T5LM, not a base model, classifier or GRU")


def _new_tokens(prompt_len: int, max_new_tokens: int | None, max_length: int | None) -> int:
    if max_new_tokens is not None and max_length is not None and prompt_len + max_new_tokens != max_length:
        raise ValueError(f"conflicting lengths: max_new_tokens={max_new_tokens} and max_length={max_length} with a "
                         f"{prompt_len}-token prompt; pass one of them")
    if max_new_tokens is None:
        if max_length is None:
            raise ValueError("pass max_new_tokens or max_length")
        max_new_tokens = max_length - prompt_len
    if max_new_tokens < 1:
        raise ValueError(f"nothing to generate: max_new_tokens={max_new_tokens} (max_length includes the prompt)")
    return max_new_tokens


def pick_next(logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
              generator: torch.Generator | None) -> Tensor:
    """Greedy argmax, or a sample after temperature, top-k and nucleus (top-p) filtering."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model: nn.Module, input_ids: Int[Tensor, "batch pos"], attention_mask: Tensor | None = None, *,
             max_new_tokens: int | None = None, max_length: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, pad_token_id: int | None = None, seed: int | None = None,
             use_cache: bool = True, output_scores: bool = False,
             around: Callable[[int], AbstractContextManager] | None = None) -> Any:
    """Decode up to `max_new_tokens`; returns the ids (prompt + new; for T5 the decoder ids), and with
    `output_scores=True` also the logits of every step (batch, new, d_vocab).

    `around(step)` wraps each forward pass (0 = prompt, k = the k-th decode pass) in a context manager: this is
    how IntervenableModel attaches its hooks per step. `use_cache=False` recomputes the whole sequence each step
    (slow; for checking the cache).
    """
    _check_generative(model)
    around = around or (lambda step: nullcontext())
    enc_dec = _is_encoder_decoder(model)
    new = _new_tokens(1 if enc_dec else input_ids.shape[1], max_new_tokens, max_length)  # T5: counts the start
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and input_ids.shape[1] + new > n_ctx:
        raise ValueError(f"prompt ({input_ids.shape[1]}) + {new} new tokens exceeds the model's context of {n_ctx}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    batch = input_ids.shape[0]
    if enc_dec:
        start = getattr(model.cfg, "decoder_start_token_id", 0)
        ids = torch.full((batch, 1), start, dtype=torch.long, device=input_ids.device)
    else:
        ids = input_ids
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    cache, enc_out, scores = (KVCache() if use_cache else None), None, []
    for step in range(new):
        with around(step):
            if enc_dec:
                feed = ids[:, -1:] if cache is not None and step > 0 else ids
                out = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=feed,
                            encoder_outputs=enc_out, past_key_values=cache, use_cache=cache is not None)
                enc_out = out.encoder_last_hidden_state
            else:
                positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count from the first real token
                feed = ids[:, -1:] if cache is not None and step > 0 else ids
                out = model(input_ids=feed, attention_mask=mask, position_ids=positions[:, -feed.shape[1]:],
                            past_key_values=cache, use_cache=cache is not None)
        logits = out.logits[:, -1]
        scores.append(logits)
        token = pick_next(logits, do_sample, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, pad), token)
            done |= token == eos_token_id
        ids = torch.cat([ids, token[:, None]], dim=1)
        if not enc_dec:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
    return (ids, torch.stack(scores, dim=1)) if output_scores else ids


def intervened_generate(iv: Any, base: Any, sources: Any = None, unit_locations: Any = None,
                        source_representations: Any = None, intervene_on_prompt: bool = True,
                        intervene_on_generated: bool | None = None, generated_steps: list[int] | None = None,
                        subspaces: Any = None, output_original_output: bool = False,
                        **kwargs: Any) -> tuple[Any, Any]:
    """IntervenableModel.generate: returns `(original ids or None, intervened ids)`, or with a Collect
    intervention `((original, collected activations), intervened ids)`. See the module docstring for when
    interventions apply; `**kwargs` go to `generate` (max_new_tokens, max_length, do_sample, temperature, ...)."""
    from hookvene.intervenable import flatten_collected
    from hookvene.interventions import CollectIntervention
    from hookvene.utils import as_inputs

    base = as_inputs(base)
    input_ids, mask = base["input_ids"], base.get("attention_mask")
    if intervene_on_generated is None:
        intervene_on_generated = unit_locations is None
    srcs = iv._sources(sources)
    given = iv._given(source_representations)
    prompt_plans = iv._plan(base, srcs, unit_locations, subspaces, given)
    _check_when(iv, prompt_plans, input_ids.shape[1], unit_locations, intervene_on_prompt, intervene_on_generated,
                generated_steps, kwargs)
    if srcs is not None:
        iv._run_sources(srcs, prompt_plans, list(range(iv.n_groups)))
    step_plans = None
    if intervene_on_generated:
        needs_run = [s.key for s, p in zip(iv.slots, prompt_plans) if p.source == "run"]
        if needs_run:
            raise ValueError(f"interventions {needs_run} read a source run, which only has prompt positions; pass "
                             f"intervene_on_generated=False (prompt only) or source_representations=")
        step_plans = iv._plan({"input_ids": input_ids[:, :1]}, None, None, subspaces, given)
    collected: dict[str, list[Tensor]] = {s.key: [] for s in iv.slots}

    def setters(plans: list) -> list:
        return [iv._setter(s, p, collected) for s, p in zip(iv.slots, plans) if p.source != "skip"]

    def around(step: int) -> AbstractContextManager:
        if step == 0:
            return iv._attached(setters(prompt_plans)) if intervene_on_prompt else nullcontext()
        wanted = step_plans is not None and (generated_steps is None or step - 1 in generated_steps)
        return iv._attached(setters(step_plans)) if wanted else nullcontext()

    original = generate(iv.model, input_ids, mask, **kwargs) if output_original_output else None
    ids = generate(iv.model, input_ids, mask, around=around, **kwargs)
    if any(isinstance(s.intervention, CollectIntervention) for s in iv.slots):
        return (original, flatten_collected(iv.slots, collected)), ids
    return original, ids


def _check_when(iv: Any, plans: list, prompt_len: int, unit_locations: Any, on_prompt: bool, on_generated: bool,
                steps: list[int] | None, kwargs: dict[str, Any]) -> None:
    """Refuse settings under which an intervention would silently never apply."""
    for slot, plan in zip(iv.slots, plans):
        if plan.base_sel is not None and slot.rep.unit in ("pos", "h.pos"):
            top = max((i for row in plan.base_sel.levels[-1] for i in row), default=0)
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
