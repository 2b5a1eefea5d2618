"""Every pyvene component name reads the hook written here by hand, seen in pyvene's layout.

The expectations below are typed out, not computed from `hookvene/components.py`: a table entry that points at the
wrong hook (say T5's `decoder.mlp_input` at `ln2` instead of `ln3`), the wrong layer, the wrong view (heads not
permuted, the wrong third of the GRU's fused projection) or the wrong unit dimension makes a test here fail.
(Checked by planting such entries in a copy of the package.) What each hook *means* is checked against the modules
themselves in `tests/test_components.py`.

Views, as pyvene showed each tensor (hooks store heads as (batch, pos, head, d_head)):
    as_is     the hook tensor itself (streams (batch, pos, d); GRU hooks (batch, d) per step)
    merged    (batch, pos, head * d_head)              query_output, attention_value_output, ...
    heads     (batch, head, pos, d_head)               head_query_output, head_attention_value_output, ...
    pattern   (batch, head, q_pos, k_pos), unit h      attention_weight, attention_scores
    x/3       one third of the GRU's fused (r | z | n) projection: reset = first, update = second, new = last
"""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import hookvene as pv
from tests.helpers import close

H = 6  # GRU hidden width (x2h / h2h hooks are 3 * H wide)

# GPT-2, GPT-Neo and the T5 encoder: component -> (hook inside "blocks.{i}.", view)
BLOCK = {
    "block_input": ("hook_resid_pre", "as_is"),
    "block_output": ("hook_resid_post", "as_is"),
    "residual_mid": ("hook_resid_mid", "as_is"),
    "attention_input": ("ln1.hook_normalized", "as_is"),
    "attention_output": ("hook_attn_out", "as_is"),
    "attention_value_output": ("attn.hook_z", "merged"),
    "head_attention_value_output": ("attn.hook_z", "heads"),
    "attention_weight": ("attn.hook_pattern", "pattern"),
    "attention_scores": ("attn.hook_attn_scores", "pattern"),
    "query_output": ("attn.hook_q", "merged"),
    "key_output": ("attn.hook_k", "merged"),
    "value_output": ("attn.hook_v", "merged"),
    "head_query_output": ("attn.hook_q", "heads"),
    "head_key_output": ("attn.hook_k", "heads"),
    "head_value_output": ("attn.hook_v", "heads"),
    "mlp_input": ("ln2.hook_normalized", "as_is"),
    "mlp_pre_activation": ("mlp.hook_pre", "as_is"),
    "mlp_activation": ("mlp.hook_post", "as_is"),
    "mlp_output": ("hook_mlp_out", "as_is"),
}

# The T5 decoder, in full: ln1 feeds self-attention, ln2 cross-attention, ln3 the MLP.
DECODER = {
    "block_input": ("hook_resid_pre", "as_is"),
    "block_output": ("hook_resid_post", "as_is"),
    "residual_mid": ("hook_resid_mid", "as_is"),
    "residual_mid_cross": ("hook_resid_mid_cross", "as_is"),
    "attention_input": ("ln1.hook_normalized", "as_is"),
    "attention_output": ("hook_attn_out", "as_is"),
    "attention_value_output": ("attn.hook_z", "merged"),
    "head_attention_value_output": ("attn.hook_z", "heads"),
    "attention_weight": ("attn.hook_pattern", "pattern"),
    "attention_scores": ("attn.hook_attn_scores", "pattern"),
    "query_output": ("attn.hook_q", "merged"),
    "key_output": ("attn.hook_k", "merged"),
    "value_output": ("attn.hook_v", "merged"),
    "head_query_output": ("attn.hook_q", "heads"),
    "head_key_output": ("attn.hook_k", "heads"),
    "head_value_output": ("attn.hook_v", "heads"),
    "cross_attention_input": ("ln2.hook_normalized", "as_is"),
    "cross_attention_output": ("hook_cross_attn_out", "as_is"),
    "cross_attention_value_output": ("cross_attn.hook_z", "merged"),
    "head_cross_attention_value_output": ("cross_attn.hook_z", "heads"),
    "cross_attention_weight": ("cross_attn.hook_pattern", "pattern"),
    "cross_query_output": ("cross_attn.hook_q", "merged"),
    "cross_key_output": ("cross_attn.hook_k", "merged"),
    "cross_value_output": ("cross_attn.hook_v", "merged"),
    "head_cross_query_output": ("cross_attn.hook_q", "heads"),
    "head_cross_key_output": ("cross_attn.hook_k", "heads"),
    "head_cross_value_output": ("cross_attn.hook_v", "heads"),
    "mlp_input": ("ln3.hook_normalized", "as_is"),
    "mlp_pre_activation": ("mlp.hook_pre", "as_is"),
    "mlp_activation": ("mlp.hook_post", "as_is"),
    "mlp_output": ("hook_mlp_out", "as_is"),
}

# The GRU: component -> (hook inside "layers.{i}.", view); unit t, one step at a time.
GRU_CELL = {
    "cell_input": ("hook_in", "as_is"),
    "cell_output": ("hook_hidden", "as_is"),
    "reset_gate_input": ("hook_reset_pre", "as_is"),
    "reset_gate_output": ("hook_reset", "as_is"),
    "update_gate_input": ("hook_update_pre", "as_is"),
    "update_gate_output": ("hook_update", "as_is"),
    "new_gate_input": ("hook_candidate_pre", "as_is"),
    "new_gate_output": ("hook_candidate", "as_is"),
    "x2h_output": ("hook_x2h", "as_is"),
    "h2h_output": ("hook_h2h", "as_is"),
    "reset_x2h_output": ("hook_x2h", "first third"),
    "update_x2h_output": ("hook_x2h", "second third"),
    "new_x2h_output": ("hook_x2h", "last third"),
    "reset_h2h_output": ("hook_h2h", "first third"),
    "update_h2h_output": ("hook_h2h", "second third"),
    "new_h2h_output": ("hook_h2h", "last third"),
}

VIEWS = {
    "as_is": lambda t: t,
    "merged": lambda t: t.flatten(2),
    "heads": lambda t: t.transpose(1, 2),
    "pattern": lambda t: t,
    "first third": lambda t: t[..., :H],
    "second third": lambda t: t[..., H:2 * H],
    "last third": lambda t: t[..., 2 * H:],
}
UNIT = {"heads": "h", "pattern": "h"}  # every other transformer view: "pos"


def _sharpen(hf, seed):
    """Weights larger than HF's init, so different hooks (and layers) hold clearly different values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.4 if p.dim() == 2 else 0.1) + (p.dim() == 1) * 1.0)
    return hf.eval()


def _models():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=40, n_positions=16))
    neo = GPTNeoForCausalLM(GPTNeoConfig(hidden_size=16, num_layers=2, num_heads=2, vocab_size=40,
                                         max_position_embeddings=16, window_size=2,
                                         attention_types=[[["global", "local"], 1]]))
    # 3 heads of 4 (inner 12 != d_model 16); 2 encoder and 3 decoder layers; 5 encoder and 4 decoder positions
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                                             num_decoder_layers=3, num_heads=3, dropout_rate=0.0,
                                             decoder_start_token_id=0))
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(0, 40, (2, 5), generator=g)}
    t5_inputs = dict(inputs, decoder_input_ids=torch.randint(0, 40, (2, 4), generator=g))
    _, _, gru = pv.create_gru_classifier(pv.GRUConfig(h_dim=H, d_in=5, n_layer=2))
    gru_inputs = {"inputs_embeds": torch.randn(2, 5, 5, generator=g)}
    return {"gpt2": (pv.from_pretrained(_sharpen(gpt2, 2)), inputs),
            "gpt_neo": (pv.from_pretrained(_sharpen(neo, 3)), inputs),
            "t5": (pv.from_pretrained(_sharpen(t5, 4)), t5_inputs),
            "gru": (gru.eval(), gru_inputs)}


MODELS = _models()

# (arch, component, layer, hook name, view): the last layer of each stack
CASES = (
    [("gpt2", c, 1, f"blocks.1.{h}", v) for c, (h, v) in BLOCK.items()]
    + [("gpt_neo", c, 1, f"blocks.1.{h}", v) for c, (h, v) in BLOCK.items()]
    + [("t5", f"encoder.{c}", 1, f"encoder.blocks.1.{h}", v) for c, (h, v) in BLOCK.items()]
    + [("t5", c, 1, f"encoder.blocks.1.{h}", v) for c, (h, v) in BLOCK.items()]  # a bare name means the encoder
    + [("t5", f"decoder.{c}", 2, f"decoder.blocks.2.{h}", v) for c, (h, v) in DECODER.items()]
)
GRU_CASES = [(c, 1, f"layers.1.{h}", v) for c, (h, v) in GRU_CELL.items()]


def _collect(model, inputs, layer, component, unit, unit_locations=None):
    iv = pv.IntervenableModel({"layer": layer, "component": component, "unit": unit,
                               "intervention_type": pv.CollectIntervention}, model)
    (_, collected), out = iv(inputs, unit_locations=unit_locations)
    return torch.stack(collected), out


@pytest.mark.parametrize("arch,component,layer,hook,view", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_component_reads_the_named_hook(arch, component, layer, hook, view):
    """The whole tensor equals the named hook in pyvene's view; unit index 1 selects view dimension 1 (a position,
    or a head for head and pattern components); collecting leaves the output alone."""
    model, inputs = MODELS[arch]
    unit = UNIT.get(view, "pos")
    _, cache = model.run_with_cache(**inputs, names_filter=hook)
    expected = VIEWS[view](cache[hook])
    collected, out = _collect(model, inputs, layer, component, unit)
    close(collected, expected)
    close(out.logits, model(**inputs).logits)
    one, _ = _collect(model, inputs, layer, component, unit, {"base": 1})
    close(one, expected[:, [1]])


@pytest.mark.parametrize("component,layer,hook,view", GRU_CASES, ids=[c[0] for c in GRU_CASES])
def test_gru_component_reads_the_named_hook_at_its_step(component, layer, hook, view):
    """Unit t = 3 collects the hook's (batch, width) tensor at time step 3, in pyvene's view."""
    model, inputs = MODELS["gru"]
    _, cache = model.run_with_cache(**inputs, names_filter=hook)
    collected, out = _collect(model, inputs, layer, component, "t", {"base": 3})
    close(collected, VIEWS[view](cache[hook][:, 3]))
    close(out.logits, model(**inputs).logits)


def test_gru_cell_input_of_layer_0_is_the_model_input():
    """Layer 0 reads x_t (d_in = 5 wide, not h_dim): the alias is not shifted by a layer."""
    model, inputs = MODELS["gru"]
    collected, _ = _collect(model, inputs, 0, "cell_input", "t", {"base": 2})
    close(collected, inputs["inputs_embeds"][:, 2])


@pytest.mark.parametrize("arch,expected", [
    ("gpt2", set(BLOCK)), ("gpt_neo", set(BLOCK)), ("gru", set(GRU_CELL)),
    ("t5", set(BLOCK) | {f"encoder.{c}" for c in BLOCK} | {f"decoder.{c}" for c in DECODER}),
])
def test_every_supported_component_has_a_hand_written_expectation(arch, expected):
    """A component added to hookvene without an entry above fails here, so it cannot go unchecked."""
    model, _ = MODELS[arch]
    pv.IntervenableModel({"layer": 0, "component": sorted(expected)[0], "unit": "t" if arch == "gru" else "pos",
                          "intervention_type": pv.CollectIntervention}, model)  # makes sure tables are registered
    assert set(pv.type_to_module_mapping[type(model)]) == expected
