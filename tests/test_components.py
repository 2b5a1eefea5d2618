"""Every pyvene component alias of every architecture reads the hook it documents, in pyvene's layout."""

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
from hookvene.components import GPT_TABLE, GRU_TABLE, T5_TABLE


def _view(t: torch.Tensor, view: str) -> torch.Tensor:
    """What pyvene's component shows, computed by hand from the cached hook tensor."""
    if view == "merge_heads":
        return t.flatten(-2)  # (b, pos, head, d_head) -> (b, pos, head * d_head)
    if view == "heads":
        return t.transpose(1, 2)  # -> (b, head, pos, d_head)
    return t


def _models():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=16)).eval()
    neo = GPTNeoForCausalLM(GPTNeoConfig(hidden_size=16, num_layers=2, num_heads=2, vocab_size=40,
                                         max_position_embeddings=16, window_size=2,
                                         attention_types=[[["global", "local"], 1]])).eval()
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=3,
                                             dropout_rate=0.0, decoder_start_token_id=0)).eval()
    return {"gpt2": (pv.from_pretrained(gpt2), GPT_TABLE), "gpt_neo": (pv.from_pretrained(neo), GPT_TABLE),
            "t5": (pv.from_pretrained(t5), T5_TABLE)}


MODELS = _models()
CASES = [(arch, comp) for arch, (_, table) in MODELS.items() for comp in table]


@pytest.mark.parametrize("arch,component", CASES)
def test_component_alias_reads_its_hook(arch, component):
    model, table = MODELS[arch]
    template, view, _, _ = table[component]
    hook = template.format(layer=1)
    inputs = {"input_ids": torch.randint(0, 40, (2, 5))}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(0, 40, (2, 4))
    unit = "h" if view in ("heads", "pattern") else "pos"
    iv = pv.IntervenableModel({"layer": 1, "component": component, "unit": unit,
                               "intervention_type": pv.CollectIntervention}, model)
    (_, collected), out = iv(inputs)  # no unit_locations: the whole tensor
    _, cache = model.run_with_cache(**inputs, names_filter=hook)
    torch.testing.assert_close(torch.stack(collected), _view(cache[hook], view))
    torch.testing.assert_close(out.logits, model(**inputs).logits)  # collecting changes nothing


@pytest.mark.parametrize("component", list(GRU_TABLE))
def test_gru_component_alias_reads_its_hook_at_step(component):
    _, _, gru = pv.create_gru_classifier(pv.GRUConfig(h_dim=6, n_layer=2))
    template, view, _, _ = GRU_TABLE[component]
    hook = template.format(layer=1)
    x = torch.rand(2, 5, 6)
    iv = pv.IntervenableModel({"layer": 1, "component": component, "unit": "t",
                               "intervention_type": pv.CollectIntervention}, gru)
    (_, collected), _ = iv({"inputs_embeds": x}, unit_locations={"base": 3})
    _, cache = gru.run_with_cache(inputs_embeds=x, names_filter=hook)
    expected = cache[hook][:, 3]  # (batch, width) at time step 3
    if view.startswith("step_slice"):
        i = int(view[-1])
        expected = expected[:, i * 6:(i + 1) * 6]
    torch.testing.assert_close(torch.stack(collected), expected)


def test_every_hook_is_covered_by_some_component_or_is_global():
    """The tables reach every per-layer hook of the GPT family."""
    model, table = MODELS["gpt2"]
    reached = {t.format(layer=1) for t, *_ in table.values()}
    layer_hooks = {h for h in model.hook_dict if h.startswith("blocks.1.")}
    assert layer_hooks - reached == set(), layer_hooks - reached
