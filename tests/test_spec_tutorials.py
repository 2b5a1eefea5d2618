"""Tutorials 1-5 of the second seed (/work/shared/spec/002_e0815b699def1fdf.txt), ported.

`AutoModelForCausalLM.from_pretrained("gpt2")` (and "gpt2-xl" in tutorial 2) -> the same call on the local
12-layer, 256-wide random checkpoint `gpt2_dir`; the tokenizer comes from the same directory. The `transformers`
model object goes straight into `pv.IntervenableModel`, which converts it to a hookvene GPT-2 sharing its weights.
Tutorial 6 (generation) is tested elsewhere."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hookvene as pv
from tests.helpers import close

ATOL_HF = 1e-4  # hookvene vs transformers on the same weights


def load(gpt2_dir):
    return AutoModelForCausalLM.from_pretrained(gpt2_dir), AutoTokenizer.from_pretrained(gpt2_dir)


# -- Tutorial 1: Basic Activation Patching -------------------------------------------------------------------------


def test_tutorial_1_basic_activation_patching(gpt2_dir, capsys):
    # 1. Load model
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)

    # 2. Prepare inputs
    base_prompt = "The Colosseum is in the city of"
    source_prompt = "The Eiffel Tower is in the city of"

    base_inputs = tokenizer(base_prompt, return_tensors="pt")
    source_inputs = tokenizer(source_prompt, return_tensors="pt")

    # 3. Define intervention (patch layer 8)
    config = pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=8,
                component="block_output",
                intervention_type=pv.VanillaIntervention,
            )
        ]
    )

    intervenable = pv.IntervenableModel(config, model)

    # the transformers object was converted, sharing its weights
    assert isinstance(intervenable.model, pv.GPT2LM)
    assert intervenable.model.embed.weight.data_ptr() == model.transformer.wte.weight.data_ptr()

    # 4. Run intervention
    # Without unit_locations the whole block output is swapped, which needs prompts of equal length. With this
    # tokenizer (as with GPT-2's) the prompts have 7 and 8 tokens, so hookvene refuses with a clear ValueError...
    assert base_inputs["input_ids"].shape[1] != source_inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match="cannot be broadcast"):
        _, patched_outputs = intervenable(
            base=base_inputs,
            sources=[source_inputs],
        )
    assert not intervenable.model.has_hooks()
    # ... and the rest of the cell runs with an equal-length source prompt.
    source_prompt = "The Tower is in the city of"
    source_inputs = tokenizer(source_prompt, return_tensors="pt")
    assert source_inputs["input_ids"].shape == base_inputs["input_ids"].shape

    _, patched_outputs = intervenable(
        base=base_inputs,
        sources=[source_inputs],
    )

    # 5. Check predictions
    patched_logits = patched_outputs.logits
    probs = torch.softmax(patched_logits[0, -1], dim=-1)

    rome_token = tokenizer.encode(" Rome")[0]
    paris_token = tokenizer.encode(" Paris")[0]

    print(f"P(Rome): {probs[rome_token].item():.4f}")
    print(f"P(Paris): {probs[paris_token].item():.4f}")

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("P(Rome): ") and lines[1].startswith("P(Paris): ")
    # swapping the whole residual stream after layer 8 makes the rest of the run the source's run
    with torch.no_grad():
        source_logits = model(**source_inputs).logits
        base_logits = model(**base_inputs).logits
    close(patched_logits, source_logits, ATOL_HF)
    assert (patched_logits - base_logits).abs().max() > 1e-3


# -- Tutorial 2: Causal Tracing (ROME-style) -----------------------------------------------------------------------


def test_tutorial_2_causal_tracing(gpt2_dir, capsys):
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)  # "gpt2-xl" in the seed
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)

    # 1. Define prompts
    clean_prompt = "The Space Needle is in downtown"
    # We'll corrupt by adding noise to embeddings

    clean_inputs = tokenizer(clean_prompt, return_tensors="pt")
    seattle_token = tokenizer.encode(" Seattle")[0]

    # 2. Get clean baseline
    with torch.no_grad():
        clean_outputs = model(**clean_inputs)
        clean_prob = torch.softmax(clean_outputs.logits[0, -1], dim=-1)[seattle_token].item()

    print(f"Clean P(Seattle): {clean_prob:.4f}")

    # 3. Sweep over layers - corrupt input, restore at each layer
    results = []

    for restore_layer in range(model.config.n_layer):
        # Config: add noise at input, restore at target layer
        config = pv.IntervenableConfig(
            representations=[
                # Noise intervention at embedding
                pv.RepresentationConfig(
                    layer=0,
                    component="block_input",
                    intervention_type=pv.NoiseIntervention,
                ),
                # Restore clean at target layer
                pv.RepresentationConfig(
                    layer=restore_layer,
                    component="block_output",
                    intervention_type=pv.VanillaIntervention,
                ),
            ]
        )

        intervenable = pv.IntervenableModel(config, model)

        # Source is clean (for restoration), base gets noise
        _, outputs = intervenable(
            base=clean_inputs,
            sources=[clean_inputs],  # Restore from clean
        )

        prob = torch.softmax(outputs.logits[0, -1], dim=-1)[seattle_token].item()
        results.append(prob)
        print(f"Restore at layer {restore_layer}: P(Seattle) = {prob:.4f}")

    # 4. Find critical layers (where restoration helps most)
    results = np.array(results)
    critical_layers = np.argsort(results)[-5:]
    print(f"\nMost critical layers: {critical_layers}")

    out = capsys.readouterr().out
    assert out.count("Restore at layer") == 12 and "Most critical layers" in out
    assert len(critical_layers) == 5
    # restoring the whole clean residual stream after any layer undoes the corruption completely
    np.testing.assert_allclose(results, clean_prob, atol=ATOL_HF)
    # while the corruption alone does change the prediction
    noise_only = pv.IntervenableModel(
        [pv.RepresentationConfig(layer=0, component="block_input", intervention_type=pv.NoiseIntervention)], model)
    _, corrupted = noise_only(base=clean_inputs)
    assert (corrupted.logits - clean_outputs.logits).abs().max() > 1e-3


# -- Tutorial 3: Trainable Interventions (DAS) -----------------------------------------------------------------------


def test_tutorial_3_trainable_interventions(gpt2_dir, capsys):
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)

    # 1. Define trainable intervention
    config = pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=6,
                component="block_output",
                intervention_type=pv.LowRankRotatedSpaceIntervention,
                low_rank_dimension=64,  # Learn 64-dim subspace
            )
        ]
    )

    intervenable = pv.IntervenableModel(config, model)

    # 2. Setup optimizer
    optimizer = torch.optim.Adam(
        intervenable.get_trainable_parameters(),
        lr=1e-3
    )

    # 3. Training data (simplified example)
    # Goal: Make model predict "Paris" instead of "Rome"
    base_prompt = "The capital of Italy is"
    target_token = tokenizer.encode(" Paris")[0]

    base_inputs = tokenizer(base_prompt, return_tensors="pt")

    # 4. Training loop (100 steps in the seed; 10 here for speed)
    losses = []
    for step in range(10):
        optimizer.zero_grad()

        _, outputs = intervenable(
            base=base_inputs,
            sources=[base_inputs],  # Self-intervention
        )

        # Loss: maximize probability of target token
        logits = outputs.logits[0, -1]
        loss = -torch.log_softmax(logits, dim=-1)[target_token]

        loss.backward()
        optimizer.step()
        losses.append(loss.item())

        if step % 20 == 0:
            prob = torch.softmax(logits.detach(), dim=-1)[target_token].item()
            print(f"Step {step}: loss={loss.item():.4f}, P(Paris)={prob:.4f}")

    # 5. Analyze learned rotation
    rotation = intervenable.interventions["layer.6.comp.block_output.unit.pos.nunit.1#0"][0]
    print(f"Learned rotation shape: {rotation.rotate_layer.weight.shape}")

    out = capsys.readouterr().out
    assert "Step 0: loss=" in out
    assert "Learned rotation shape: torch.Size([256, 64])" in out
    assert rotation is intervenable.interventions["layer_6_comp_block_output_unit_pos_nunit_1#0"][0]
    # A self-intervention (source == base) is the identity for any rotation: b + ((b - b) W) W^T = b, so the seed's
    # loop cannot lower the loss. The output equals the plain model's and the loss stays put.
    with torch.no_grad():
        plain = model(**base_inputs).logits[0, -1]
    close(outputs.logits[0, -1].detach(), plain, ATOL_HF)
    assert max(losses) - min(losses) < 1e-4

    # With a different source (same length) the same loop does learn: the loss decreases.
    source_inputs = tokenizer("The capital of Spain is", return_tensors="pt")
    optimizer = torch.optim.Adam(intervenable.get_trainable_parameters(), lr=1e-2)
    losses = []
    for _step in range(10):
        optimizer.zero_grad()
        _, outputs = intervenable(base=base_inputs, sources=[source_inputs])
        loss = -torch.log_softmax(outputs.logits[0, -1], dim=-1)[target_token]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    w = rotation.rotate_layer.weight.detach()
    close(w.T @ w, torch.eye(64), 1e-4)  # still orthonormal columns after training


# -- Tutorial 4: Position-Specific Intervention -----------------------------------------------------------------------


def test_tutorial_4_position_specific_intervention(gpt2_dir):
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)

    # 1. Setup
    base_prompt = "John and Mary went to the store"
    source_prompt = "Alice and Bob went to the store"

    base_inputs = tokenizer(base_prompt, return_tensors="pt")
    source_inputs = tokenizer(source_prompt, return_tensors="pt")

    # 2. Position-specific config
    config = pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=5,
                component="block_output",
                intervention_type=pv.VanillaIntervention,
                unit="pos",
                max_number_of_units=1,  # Single position
            )
        ]
    )

    intervenable = pv.IntervenableModel(config, model)

    # 3. Intervene at position 0 only (first name)
    _, outputs = intervenable(
        base=base_inputs,
        sources=[source_inputs],
        unit_locations={"sources->base": ([[[0]]], [[[0]]])},
    )
    outputs_0 = outputs

    # 4. Intervene at multiple positions
    _, outputs = intervenable(
        base=base_inputs,
        sources=[source_inputs],
        unit_locations={"sources->base": ([[[0, 2]]], [[[0, 2]]])},
    )

    # oracle on the converted hookvene model (prompts have 7 and 8 tokens: positions need not line up)
    hv = intervenable.model
    hook = "blocks.5.hook_resid_post"
    src = hv.run_with_cache(source_inputs["input_ids"])[1][hook]

    def patch(positions):
        def fn(x, _):
            x = x.clone()
            x[:, positions] = src[:, positions]
            return x
        return fn

    base_ids = base_inputs["input_ids"]
    close(outputs_0.logits, hv.run_with_hooks(base_ids, fwd_hooks=[(hook, patch([0]))]).logits)
    close(outputs.logits, hv.run_with_hooks(base_ids, fwd_hooks=[(hook, patch([0, 2]))]).logits)
    assert (outputs.logits - outputs_0.logits).abs().max() > 1e-4


# -- Tutorial 5: Collecting Activations -------------------------------------------------------------------------------


def test_tutorial_5_collecting_activations(gpt2_dir, capsys):
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)

    # 1. Config with CollectIntervention
    config = pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=5,
                component="block_output",
                intervention_type=pv.CollectIntervention,
            ),
            pv.RepresentationConfig(
                layer=10,
                component="attention_output",
                intervention_type=pv.CollectIntervention,
            ),
        ]
    )

    intervenable = pv.IntervenableModel(config, model)

    # 2. Run and collect
    inputs = tokenizer("Hello world", return_tensors="pt")
    _, collected = intervenable(base=inputs)

    # 3. Access collected activations
    layer5_output = collected[0]
    layer10_attn = collected[1]

    print(f"Layer 5 block output shape: {layer5_output.shape}")
    print(f"Layer 10 attention output shape: {layer10_attn.shape}")

    out = capsys.readouterr().out
    assert "Layer 5 block output shape: torch.Size(" in out and "Layer 10 attention output shape:" in out
    # Note: as in pyvene, `collected` above is the *model output* (the second element of the returned pair);
    # the collected activations are in the first element: ((original_outputs, activations), outputs).
    (original, activations), outputs = intervenable(base=inputs)
    assert original is None
    assert outputs.logits.shape == (1, 2, len(tokenizer))
    close(collected.logits, outputs.logits)  # Collect interventions leave the output unchanged
    close(outputs.logits, model(**inputs).logits, ATOL_HF)
    # no unit_locations: each Collect returns the whole tensor, one entry per key (batch of one)
    cache = intervenable.model.run_with_cache(inputs["input_ids"])[1]
    assert [a.shape for a in activations] == [(2, 256), (2, 256)]
    close(activations[0], cache["blocks.5.hook_resid_post"][0])
    close(activations[1], cache["blocks.10.hook_attn_out"][0])

