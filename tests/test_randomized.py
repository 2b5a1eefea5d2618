"""Randomized check of IntervenableModel against a hand-written torch-hook oracle (issue 12).

Hypothesis draws an architecture (GPT-2, GPT-Neo, T5, GRU), a layer, a component, an intervention type, a batch,
unit locations and subspaces, in range or not. For every draw the call must either equal the oracle, which edits
the same hook point with plain indexing loops, or raise a ValueError / IndexError / TypeError with a message; in
both cases no hook may stay attached. Draws are derandomized (a fixed seed): CI runs the same 35 per architecture.
"""

import pytest
import torch

import hookvene as pv
from tests.helpers import tiny_gpt2

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

TYPES = [pv.VanillaIntervention, pv.ZeroIntervention, pv.AdditionIntervention, pv.CollectIntervention]
# arch -> component -> (hook name pattern, view); views: "flat" (b pos d), "heads" (hook_z: b pos h d, seen as
# b h pos d), "step" (GRU: b d, once per time step)
COMPONENTS = {
    "gpt2": {"block_output": ("blocks.{}.hook_resid_post", "flat"), "mlp_output": ("blocks.{}.hook_mlp_out", "flat"),
             "attention_output": ("blocks.{}.hook_attn_out", "flat"),
             "head_attention_value_output": ("blocks.{}.attn.hook_z", "heads")},
    "gpt_neo": {"block_output": ("blocks.{}.hook_resid_post", "flat"),
                "head_attention_value_output": ("blocks.{}.attn.hook_z", "heads")},
    "t5": {"encoder.block_output": ("encoder.blocks.{}.hook_resid_post", "flat"),
           "decoder.block_output": ("decoder.blocks.{}.hook_resid_post", "flat"),
           "decoder.mlp_output": ("decoder.blocks.{}.hook_mlp_out", "flat")},
    "gru": {"cell_output": ("layers.{}.hook_hidden", "step"), "update_gate_output": ("layers.{}.hook_update", "step")},
}
N_LAYERS = 2


@pytest.fixture(scope="module")
def models():
    import transformers

    torch.manual_seed(0)
    neo = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        vocab_size=101, hidden_size=16, num_layers=N_LAYERS, num_heads=2, attention_types=[[["global", "local"], 1]],
        max_position_embeddings=32, window_size=3)).eval()
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=101, d_model=16, d_kv=4, d_ff=32, num_layers=N_LAYERS, num_decoder_layers=N_LAYERS, num_heads=2,
        dropout_rate=0.0, decoder_start_token_id=0)).eval()
    gru = pv.GRUClassifier(pv.GRUConfig(h_dim=8, n_layer=N_LAYERS, include_emb=True, vocab_size=101))
    return {"gpt2": pv.from_pretrained(tiny_gpt2(None, n_layer=N_LAYERS)), "gpt_neo": pv.from_pretrained(neo),
            "t5": pv.from_pretrained(t5), "gru": gru}


@st.composite
def draws(draw, arch):
    component = draw(st.sampled_from(sorted(COMPONENTS[arch])))
    view = COMPONENTS[arch][component][1]
    unit = {"flat": "pos", "step": "t", "heads": draw(st.sampled_from(["h.pos", "h"]))}[view]
    batch, n_pos, n_enc = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    layer = draw(st.one_of(st.integers(-1, N_LAYERS), st.just("0"))) if draw(st.integers(0, 9)) == 0 \
        else draw(st.integers(0, N_LAYERS - 1))

    def rows(top):  # per example, k distinct indices in 0..top-1; now and then one is -1 or top (out of range)
        k = draw(st.integers(1, min(2, top)))
        out = [draw(st.lists(st.integers(0, top - 1), min_size=k, max_size=k, unique=True)) for _ in range(batch)]
        if draw(st.integers(0, 5)) == 0:
            out[draw(st.integers(0, batch - 1))][0] = draw(st.sampled_from([-1, top]))
        return out

    n_units = n_pos if not component.startswith("encoder.") else n_enc  # T5: the encoder's or the decoder's
    if unit == "h.pos":
        locs = [rows(2), rows(n_units)]
    elif unit == "h":
        locs = rows(2)
    else:
        locs = rows(n_units)
    subspaces = None
    if draw(st.booleans()):
        k = draw(st.integers(1, 3))
        lo = -9 if draw(st.integers(0, 5)) == 0 else -8  # widths are 8 or more: -9 is out of range for 8
        subspaces = [draw(st.lists(st.integers(lo, 7), min_size=k, max_size=k, unique=True)) for _ in range(batch)]
    kind = draw(st.sampled_from(TYPES))
    seed = draw(st.integers(0, 1000))
    return dict(arch=arch, component=component, view=view, unit=unit, batch=batch, n_pos=n_pos, n_enc=n_enc,
                layer=layer, locs=locs, subspaces=subspaces, kind=kind, seed=seed)


def inputs(d, seed):
    g = torch.Generator().manual_seed(seed)
    x = {"input_ids": torch.randint(0, 101, (d["batch"], d["n_pos"] if d["arch"] != "t5" else d["n_enc"]),
                                    generator=g)}
    if d["arch"] == "t5":
        x["decoder_input_ids"] = torch.randint(0, 101, (d["batch"], d["n_pos"]), generator=g)
    return x


def valid(d, model) -> bool:
    """Whether every index of the draw exists (the oracle's own notion, written independently of hookvene)."""
    if not isinstance(d["layer"], int) or not 0 <= d["layer"] < N_LAYERS:
        return False
    n_units = d["n_enc"] if d["component"].startswith("encoder.") else d["n_pos"]
    n_heads = getattr(model.cfg, "n_heads", None)
    if d["unit"] == "h.pos":
        levels = [(d["locs"][0], n_heads), (d["locs"][1], n_units)]
    elif d["unit"] == "h":
        levels = [(d["locs"], n_heads)]
    else:
        levels = [(d["locs"], n_units)]
    if any(not 0 <= i < n for rows, n in levels for r in rows for i in r):
        return False
    width = {"heads": getattr(model.cfg, "d_head", None)}.get(d["view"], model.cfg.d_model)
    return d["subspaces"] is None or all(-width <= i < width for r in d["subspaces"] for i in r)


def oracle(model, d, base, source):
    """The call done by hand: read the source activation with a plain hook, then edit the base run's activation
    at every selected (example, unit, dim) in Python loops. Returns (output, collected rows)."""
    hook = COMPONENTS[d["arch"]][d["component"]][0].format(d["layer"])
    kind, locs, subs = d["kind"], d["locs"], d["subspaces"]
    stored = {}

    def read(x, h):
        stored[h.step] = x.detach().clone()

    if kind in (pv.VanillaIntervention, pv.AdditionIntervention):
        with model.hooks([(hook, read)]):
            model(**source)
    collected = []

    def apply(dst, src):
        """dst: one unit's vector (a view into the edited copy); src: the source's at the same place."""
        dims = list(range(dst.shape[-1])) if subs is None else subs[r]
        if kind is pv.CollectIntervention:
            collected.append(dst[dims].clone())
        elif kind is pv.ZeroIntervention:
            dst[dims] = 0
        elif kind is pv.VanillaIntervention:
            dst[dims] = src[dims]
        else:
            dst[dims] = dst[dims] + src[dims]

    def edit(x, h):
        nonlocal r
        x, src = x.clone(), stored.get(h.step)
        for r in range(x.shape[0]):
            if d["view"] == "step":
                if h.step in locs[r]:
                    apply(x[r], None if src is None else src[r])
                    steps_seen.append((r, h.step))
            elif d["view"] == "flat":
                for p in locs[r]:
                    apply(x[r, p], None if src is None else src[r, p])
            else:  # hook_z is (b, pos, head, d_head)
                heads, positions = (locs[0][r], locs[1][r]) if d["unit"] == "h.pos" else (locs[r], range(x.shape[1]))
                for hd in heads:
                    for p in positions:
                        apply(x[r, p, hd], None if src is None else src[r, p, hd])
        return x

    r, steps_seen = 0, []
    with model.hooks([(hook, edit)]):
        out = model(**base)
    if d["view"] == "step" and collected:  # collected per example, in the order its steps were listed
        by_step = dict(zip(steps_seen, collected))
        collected = [by_step[(r, t)] for r in range(len(locs)) for t in locs[r]]
    return out, collected


def canonical(d):
    """unit_locations for one intervention in the canonical per-intervention form (no shortcut parsing)."""
    return [d["locs"]]


@pytest.mark.parametrize("arch", sorted(COMPONENTS))
@hypothesis.settings(max_examples=35, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(data=st.data())
def test_random_interventions_match_the_oracle_or_raise(models, arch, data):
    d = data.draw(draws(arch))
    model = models[arch]
    base, source = inputs(d, d["seed"]), inputs(d, d["seed"] + 1)
    kind = d["kind"]
    needs_source = kind in (pv.VanillaIntervention, pv.AdditionIntervention)
    try:
        iv = pv.IntervenableModel({"layer": d["layer"], "component": d["component"], "unit": d["unit"],
                                   "intervention_type": kind}, model)
        key = "sources->base" if needs_source else "base"
        locations = {key: (canonical(d), canonical(d))} if needs_source else {key: canonical(d)}
        subspaces = None if d["subspaces"] is None else [d["subspaces"]]
        with torch.no_grad():
            got = iv(base, [source] if needs_source else None, unit_locations=locations, subspaces=subspaces)
    except (ValueError, IndexError, TypeError) as e:
        assert str(e), "an error without a message"
        assert not valid(d, model), f"a valid draw raised {type(e).__name__}: {e}"
        hypothesis.event(f"raised {type(e).__name__}")
        return
    finally:
        assert not model.has_hooks(), "a hook was left attached"
    assert valid(d, model), "an invalid draw ran without an error"
    hypothesis.event(f"compared with the oracle: {d['arch']}")
    with torch.no_grad():
        want, collected = oracle(model, d, base, source)
    if kind is pv.CollectIntervention:
        (_, rows), out = got
        flat = [v for row in rows for v in row.reshape(-1, row.shape[-1])]
        assert len(flat) == len(collected)
        for a, b in zip(flat, collected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    else:
        out = got[1]
    torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=1e-5)
    assert not model.has_hooks()
