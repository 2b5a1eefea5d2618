"""The seed's GRU and T5 cells, ported, plus interventions on GPT-Neo, T5 and the GRU checked against hand-written
hooks (the GPT-2 cells are in test_spec_101.py, the generation cell in test_generate.py)."""

import pytest
import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM, T5Config, T5ForConditionalGeneration

import hookvene as pv
from tests.helpers import make_tokenizer

# -- GRU cells --------------------------------------------------------------------------------------------------


def test_gru_cell_zero_one_timestep():
    """Seed cell "Recurrent NNs (Intervene a Specific Timestep)", as written."""
    _, _, gru = pv.create_gru_classifier(pv.GRUConfig(h_dim=32))
    pv_gru = pv.IntervenableModel({"component": "cell_output", "unit": "t",
                                   "intervention_type": pv.ZeroIntervention}, model=gru)
    rand_t = torch.rand(1, 10, gru.config.h_dim)
    intervened_outputs = pv_gru(base={"inputs_embeds": rand_t}, unit_locations={"base": 3})

    def zero_step_3(h, hook):
        return torch.zeros_like(h) if hook.step == 3 else None
    expected = gru.run_with_hooks(inputs_embeds=rand_t, fwd_hooks=[("layers.0.hook_hidden", zero_step_3)])
    torch.testing.assert_close(intervened_outputs[1].logits, expected.logits)
    # only step 3 of layer 0 was zeroed: pyvene zeroes every step (its defect), which would differ here
    plain = gru(inputs_embeds=rand_t)
    assert not torch.allclose(plain.logits, intervened_outputs[1].logits)
    torch.testing.assert_close(plain.last_hidden_state[:, :3], intervened_outputs[1].last_hidden_state[:, :3])
    assert not gru.has_hooks()


def test_gru_cell_across_time():
    """Seed cell "Recurrent NNs (Intervene cross Time)": source step 6 -> base step 3, other steps untouched."""
    _, _, gru = pv.create_gru_classifier(pv.GRUConfig(h_dim=32))
    pv_gru = pv.IntervenableModel({"component": "cell_output", "unit": "t",
                                   "intervention_type": pv.ZeroIntervention}, model=gru)
    rand_b = torch.rand(1, 10, gru.config.h_dim)
    rand_s = torch.rand(1, 10, gru.config.h_dim)
    intervened_outputs = pv_gru(base={"inputs_embeds": rand_b}, sources=[{"inputs_embeds": rand_s}],
                                unit_locations={"sources->base": (6, 3)})
    # the cell uses ZeroIntervention (no source needed): step 3 of the base is zeroed
    zeroed = gru.run_with_hooks(inputs_embeds=rand_b, fwd_hooks=[
        ("layers.0.hook_hidden", lambda h, hook: torch.zeros_like(h) if hook.step == 3 else None)])
    torch.testing.assert_close(intervened_outputs[1].logits, zeroed.logits)
    # with an interchange the same call copies source step 6 into base step 3
    swap = pv.IntervenableModel({"component": "cell_output", "unit": "t"}, model=gru)
    _, out = swap(base={"inputs_embeds": rand_b}, sources=[{"inputs_embeds": rand_s}],
                  unit_locations={"sources->base": (6, 3)})
    _, src = gru.run_with_cache(inputs_embeds=rand_s, names_filter="layers.0.hook_hidden")
    step6 = src["layers.0.hook_hidden"][:, 6]
    expected = gru.run_with_hooks(inputs_embeds=rand_b, fwd_hooks=[
        ("layers.0.hook_hidden", lambda h, hook: step6 if hook.step == 3 else None)])
    torch.testing.assert_close(out.logits, expected.logits)


def test_gru_per_example_steps_batch_of_two():
    """Batch > 1 with different steps per example (pyvene fails here): each row changes only at its own step."""
    _, _, gru = pv.create_gru_classifier(pv.GRUConfig(h_dim=16, n_layer=2))
    x = torch.rand(2, 6, 16)
    iv = pv.IntervenableModel({"layer": 1, "component": "update_gate_output", "unit": "t",
                               "intervention_type": pv.ZeroIntervention}, model=gru)
    _, out = iv(base={"inputs_embeds": x}, unit_locations={"base": [[[1], [4]]]})  # step 1 in row 0, 4 in row 1
    steps = {0: 1, 1: 4}

    def zero_rows(z, hook):
        z = z.clone()
        for row, t in steps.items():
            if hook.step == t:
                z[row] = 0
        return z
    expected = gru.run_with_hooks(inputs_embeds=x, fwd_hooks=[("layers.1.hook_update", zero_rows)])
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state)


@pytest.mark.parametrize("component,hook,cols", [
    ("reset_x2h_output", "layers.0.hook_x2h", slice(0, 8)),
    ("new_h2h_output", "layers.0.hook_h2h", slice(16, 24)),
])
def test_gru_gate_slices(component, hook, cols):
    _, _, gru = pv.create_gru_classifier(pv.GRUConfig(h_dim=8, n_layer=1))
    x = torch.rand(1, 5, 8)
    iv = pv.IntervenableModel({"component": component, "unit": "t", "intervention_type": pv.ZeroIntervention},
                              model=gru)
    _, out = iv(base={"inputs_embeds": x}, unit_locations={"base": 2})

    def zero_cols(t, h):
        if h.step != 2:
            return None
        t = t.clone()
        t[:, cols] = 0
        return t
    expected = gru.run_with_hooks(inputs_embeds=x, fwd_hooks=[(hook, zero_cols)])
    torch.testing.assert_close(out.logits, expected.logits)


# -- T5 cell ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_and_tokenizer():
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                   eos_token_id=0, tie_word_embeddings=False)
    return T5ForConditionalGeneration(cfg).eval(), tok


def test_t5_add_new_model_type_cell(t5_and_tokenizer):
    """Seed cell "Add New Model Type": a user registers module paths for transformers' T5 class."""
    t5, tokenizer = t5_and_tokenizer
    saved = (dict(pv.type_to_module_mapping), dict(pv.type_to_dimension_mapping))
    try:
        pv.type_to_module_mapping[type(t5)] = {
            "mlp_output": ("encoder.block[%s].layer[1]", pv.models.constants.CONST_OUTPUT_HOOK),
            "attention_input": ("encoder.block[%s].layer[0]", pv.models.constants.CONST_OUTPUT_HOOK),
        }
        pv.type_to_dimension_mapping[type(t5)] = {
            "mlp_output": ("d_model",), "attention_input": ("d_model",), "block_output": ("d_model",),
            "head_attention_value_output": ("d_model/num_heads",),
        }
        pv_t5 = pv.IntervenableModel({"layer": 0, "component": "mlp_output",
                                      "source_representation": torch.zeros(t5.config.d_model)}, model=t5)
        base = tokenizer("The capital of Spain is", return_tensors="pt")
        decoder_input_ids = tokenizer("", return_tensors="pt").input_ids
        if decoder_input_ids.numel() == 0:  # the local BPE tokenizer adds no </s>; T5's tokenizer gives [[1]]
            decoder_input_ids = torch.tensor([[1]])
        base["decoder_input_ids"] = decoder_input_ids
        intervened_outputs = pv_t5(base, unit_locations={"base": 3})
    finally:
        pv.type_to_module_mapping.clear()
        pv.type_to_module_mapping.update(saved[0])
        pv.type_to_dimension_mapping.clear()
        pv.type_to_dimension_mapping.update(saved[1])

    def zero_pos_3(module, args, output):
        output = output.clone()
        output[:, 3] = 0
        return output
    handle = t5.encoder.block[0].layer[1].register_forward_hook(zero_pos_3)
    try:
        expected = t5(**base).logits
    finally:
        handle.remove()
    torch.testing.assert_close(intervened_outputs[1].logits, expected)
    assert not t5.encoder.block[0].layer[1]._forward_hooks  # nothing left attached


def test_t5_hookvene_components_match_hooks(t5_and_tokenizer):
    """hookvene's own T5: encoder and decoder (self and cross) components against hand-written hooks."""
    t5, tokenizer = t5_and_tokenizer
    model = pv.from_pretrained(t5)
    base = {**tokenizer("The capital of Spain is", return_tensors="pt"), "decoder_input_ids": torch.tensor([[0, 5, 9]])}
    source = {**tokenizer("The capital of Italy is", return_tensors="pt"),
              "decoder_input_ids": torch.tensor([[0, 7, 2]])}
    torch.testing.assert_close(model(**base).logits, t5(**base).logits, atol=1e-4, rtol=1e-4)
    for component, hook, pos in [("encoder.block_output", "encoder.blocks.1.hook_resid_post", 2),
                                 ("decoder.mlp_output", "decoder.blocks.0.hook_mlp_out", 1),
                                 ("decoder.cross_attention_output", "decoder.blocks.1.hook_cross_attn_out", 2)]:
        layer = int(hook.split(".")[2])
        iv = pv.IntervenableModel({"layer": layer, "component": component}, model)
        _, out = iv(base, [source], {"sources->base": pos})
        _, cache = model.run_with_cache(**source, names_filter=hook)

        def patch(x, h, v=cache[hook][:, pos], p=pos):
            x = x.clone()
            x[:, p] = v
            return x
        expected = model.run_with_hooks(**base, fwd_hooks=[(hook, patch)])
        torch.testing.assert_close(out.logits, expected.logits)
    iv = pv.IntervenableModel({"layer": 1, "component": "decoder.cross_attention_weight", "unit": "h",
                               "intervention_type": pv.CollectIntervention}, model)
    (_, collected), _ = iv(base, unit_locations={"base": [0, 3]})
    _, cache = model.run_with_cache(**base, names_filter="decoder.blocks.1.cross_attn.hook_pattern")
    torch.testing.assert_close(collected[0], cache["decoder.blocks.1.cross_attn.hook_pattern"][0, [0, 3]])


# -- GPT-Neo ----------------------------------------------------------------------------------------------------


def test_gpt_neo_head_components_match_hooks():
    torch.manual_seed(0)
    hf = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4,
                                        attention_types=[[["global", "local"], 1]], window_size=3,
                                        max_position_embeddings=32)).eval()
    model = pv.from_pretrained(hf)
    base, source = torch.randint(0, 60, (2, 7)), torch.randint(0, 60, (2, 7))
    iv = pv.IntervenableModel({"layer": 1, "component": "head_attention_value_output", "unit": "h.pos"}, model)
    loc = [[[[1], [2]], [[3], [5]]]]  # one intervention: [heads per example, positions per example]
    _, out = iv({"input_ids": base}, [{"input_ids": source}], {"sources->base": (loc, loc)})
    _, cache = model.run_with_cache(source, names_filter="blocks.1.attn.hook_z")
    z = cache["blocks.1.attn.hook_z"]

    def patch(x, hook):
        x = x.clone()
        x[0, 3, 1], x[1, 5, 2] = z[0, 3, 1], z[1, 5, 2]
        return x
    expected = model.run_with_hooks(base, fwd_hooks=[("blocks.1.attn.hook_z", patch)])
    torch.testing.assert_close(out.logits, expected.logits)
    # attention_weight exists for GPT-Neo (pyvene has none) and reads the local layer's banded pattern
    col = pv.IntervenableModel({"layer": 1, "component": "attention_weight", "unit": "h",
                                "intervention_type": pv.CollectIntervention}, model)
    (_, acts), _ = col({"input_ids": base}, unit_locations={"base": [0]})
    assert acts[0].shape == (1, 7, 7)
    assert torch.all(acts[0][0].tril(-3) == 0)  # window 3: keys more than 2 back are masked
