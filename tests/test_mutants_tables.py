"""Mutation testing of the loading rule tables (`RULES` in hookvene/loading/{gpt2,gpt_neo,t5,gru}.py).

mutmut mutates function bodies only, and the tables are module-level literals, so their mutants are made here: every
rule whose target is dropped, every pair of rules whose targets are swapped, and every per-layer tensor moved to
another layer. Each mutated table converts a checkpoint whose parameters are all redrawn (tests/test_parity.py's
`redraw_`: no two tensors alike); the mutant must be refused by `convert_state_dict` (a missing, unexpected or
mis-shaped tensor) or change the output by far more than the parity tolerance (4e-5). (Swaps of differently
shaped targets are left to the shape check, tested in tests/test_loading.py.) A mutant that passes both is
a table entry no test depends on.
"""

from dataclasses import replace

import pytest
import torch
from torch import nn

from hookvene.loading import gpt2, gpt_neo, gru, t5
from hookvene.loading.common import CheckpointError, load_into
from tests.helpers import tiny_gpt2
from tests.test_parity import left_padded, redraw_, t5_batch, tiny_neo, tiny_t5

CHANGED = 1e-3  # a mis-mapped tensor changes outputs by ~0.1; parity holds them to 4e-5


def _gpt2():
    hf = redraw_(tiny_gpt2(n_embd=48, n_layer=2, n_head=4, n_inner=80, tie_word_embeddings=False), seed=51)
    ids, mask, pos = left_padded(101)
    args = dict(input_ids=ids, attention_mask=mask, position_ids=pos)
    return gpt2, hf, lambda m: m(**args).logits[mask.bool()], lambda rules: gpt2.convert(
        hf.config.to_dict(), hf.state_dict(), True, "mutant")


def _gpt_neo():
    hf = redraw_(tiny_neo("GPTNeoForCausalLM", False), seed=52)
    ids, mask, pos = left_padded(97)
    args = dict(input_ids=ids, attention_mask=mask, position_ids=pos)
    return gpt_neo, hf, lambda m: m(**args).logits[mask.bool()], lambda rules: gpt_neo.convert(
        hf.config.to_dict(), hf.state_dict(), True, "mutant")


def _t5(ffn: str):
    def make():
        hf = tiny_t5("T5ForConditionalGeneration", ffn, True, seed=53)
        batch = t5_batch()
        rows = batch["decoder_attention_mask"].bool()  # real decoder positions
        return t5, hf, lambda m: m(**batch).logits[rows], lambda rules: t5.convert(hf.config.to_dict(), hf.state_dict(),
                                                                             True, "mutant")
    return make


def _gru():
    ref = redraw_(nn.GRU(5, 16, num_layers=3, batch_first=True), seed=54).eval()
    x = torch.randn(4, 9, 5, generator=torch.Generator().manual_seed(3))

    def run(m):
        return m(x)[0] if isinstance(m, nn.GRU) else m(inputs_embeds=x).last_hidden_state
    return gru, ref, run, None


ARCHS = {"gpt2": _gpt2, "gpt_neo": _gpt_neo, "t5-relu": _t5("relu"), "t5-gated": _t5("gated-gelu"), "gru": _gru}


def _convert(module, hf, convert, rules) -> nn.Module:
    """The hookvene model that `rules` (in place of module.RULES) make of `hf`; raises CheckpointError."""
    saved = module.RULES
    module.RULES = rules
    try:
        if module is gru:
            return gru.from_torch_gru({k: v.clone() for k, v in hf.state_dict().items()})
        model, state = convert(rules)
        return load_into(model, {k: v.clone() for k, v in state.items()}).eval()
    finally:
        module.RULES = saved


def _used(rule, keys) -> bool:
    pat = rule.pattern()
    return any(pat.match(k.removeprefix("transformer.")) for k in keys)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_table_mutant_is_detected(arch):
    module, hf, run, convert = ARCHS[arch]()
    rules = list(module.RULES)
    keys = list(hf.state_dict())
    with torch.no_grad():
        want = run(hf)
        assert (run(_convert(module, hf, convert, rules)) - want).abs().max() < 1e-4  # the real table: parity

        def detected(mutated) -> bool:
            try:
                got = run(_convert(module, hf, convert, mutated))
            except CheckpointError:
                return True
            return bool((got - want).abs().max() > CHANGED)

        live = [i for i, r in enumerate(rules) if r.dst is not None and _used(r, keys)]
        real = _convert(module, hf, convert, rules).state_dict()

        def shape(r):
            t = real.get(r.dst.replace("{i}", "0"))
            return None if t is None else tuple(t.shape)
        survivors = []
        for i in live:  # a rule that drops its tensor instead
            mutated = list(rules)
            mutated[i] = replace(rules[i], dst=None)
            if not detected(mutated):
                survivors.append(f"drop {rules[i].src}")
        for a in range(len(rules)):  # two rules with swapped targets (one of them used by this checkpoint)
            for b in range(a + 1, len(rules)):
                ra, rb = rules[a], rules[b]
                if ra.dst is None or rb.dst is None or not (a in live or b in live):
                    continue
                if ("{i}" in ra.dst) != ("{i}" in rb.dst):
                    continue  # a per-layer target without a layer index is not a table one could write
                if None not in (shape(ra), shape(rb)) and shape(ra) != shape(rb):
                    continue  # refused by convert_state_dict's shape check (tests/test_loading.py)
                mutated = list(rules)
                mutated[a], mutated[b] = replace(ra, dst=rb.dst), replace(rb, dst=ra.dst)
                if not detected(mutated):
                    survivors.append(f"swap {ra.src} <-> {rb.src}")
        state = real
        for i in live:  # one per-layer tensor read from the next layer
            r = rules[i]
            if "{i}" not in r.dst:
                continue
            k0, k1 = r.dst.replace("{i}", "0"), r.dst.replace("{i}", "1")
            if k0 not in state or k1 not in state or state[k0].shape != state[k1].shape:
                continue
            moved = {**state, k0: state[k1].clone(), k1: state[k0].clone()}
            m = _convert(module, hf, convert, rules)
            m.load_state_dict(moved)
            if not (run(m) - want).abs().max() > CHANGED:
                survivors.append(f"layers 0 <-> 1 of {r.src}")
    assert not survivors, survivors
