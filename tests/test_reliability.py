"""Reliability: no silent wrong answer, no change to the user's model, nothing run from a saved file (issue 12).

Each test names the guarantee it checks; README "Guarantees" points here.
"""

import copy
import json
import threading

import numpy as np
import pytest
import torch

import hookvene as pv
from hookvene.experiments import SweepResult, activation_patch, metrics
from hookvene.loading import CheckpointError
from tests.helpers import close, differs, tiny_gpt2


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    return pv.from_pretrained(tiny_gpt2(None, n_layer=2))


def ids(batch: int = 2, pos: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 101, (batch, pos), generator=torch.Generator().manual_seed(seed))


def tiny_gru() -> pv.GRUClassifier:
    torch.manual_seed(0)
    return pv.GRUClassifier(pv.GRUConfig(h_dim=8, n_layer=2, include_emb=True, vocab_size=101))


def tiny_t5(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=101, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2,
                                num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                                attn_implementation="eager")
    return transformers.T5ForConditionalGeneration(cfg).eval()


# -- 1, 2: save / load keeps everything that changes the output, and nothing else fits -----------------------------

def low_rank_config(layer: int = 0) -> dict:
    return {"layer": layer, "component": "block_output", "low_rank_dimension": 2,
            "intervention_type": pv.LowRankRotatedSpaceIntervention}


def edit_config(path, fn) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_load_fails_when_a_slot_finds_no_saved_tensors(gpt2, tmp_path):
    """config.json edited to another layer: the saved rotation is keyed to the old slot, so the new slot would
    run freshly initialised (random) weights; load names the keys it expected and found instead."""
    pv.IntervenableModel(low_rank_config(0), gpt2).save(str(tmp_path))
    edit_config(tmp_path, lambda c: c["representations"][0].update(layer=1))
    with pytest.raises(ValueError, match=r"missing \['layer_1_comp_block_output.*rotate_layer.*unused "
                                         r"\['layer_0_comp_block_output"):
        pv.IntervenableModel.load(str(tmp_path), gpt2)


def test_load_fails_on_saved_tensors_no_slot_uses(gpt2, tmp_path):
    config = [low_rank_config(0), low_rank_config(1)]
    pv.IntervenableModel(config, gpt2).save(str(tmp_path))
    edit_config(tmp_path, lambda c: c.update(representations=c["representations"][:1],
                                             intervention_settings={}))
    with pytest.raises(ValueError, match=r"missing \[\], unused \['layer_1_comp_block_output"):
        pv.IntervenableModel.load(str(tmp_path), gpt2)


@pytest.mark.parametrize("cls", [pv.VanillaIntervention, pv.RotatedSpaceIntervention,
                                 pv.BoundlessRotatedSpaceIntervention, pv.SigmoidMaskRotatedSpaceIntervention,
                                 pv.SigmoidMaskIntervention])
def test_state_set_after_construction_round_trips(gpt2, tmp_path, cls):
    """interchange_dim, temperature, boundaries and masks set after construction come back after save / load
    (before: a reloaded interchange_dim was back to the full width, outputs off by up to 0.7)."""
    iv = pv.IntervenableModel({"layer": 0, "component": "block_output", "intervention_type": cls}, gpt2)
    for x in iv.unique_interventions():
        x.set_interchange_dim(8)
        if hasattr(x, "set_temperature"):
            x.set_temperature(0.7)
        for p in x.parameters():
            torch.nn.init.normal_(p.data) if p.dim() < 2 else None  # masks and boundaries off their defaults
    call = dict(base={"input_ids": ids()}, sources=[{"input_ids": ids(seed=2)}], unit_locations={"sources->base": 2})
    _, before = iv(**call)
    iv.save(str(tmp_path))
    loaded = pv.IntervenableModel.load(str(tmp_path), gpt2)
    assert loaded.unique_interventions()[0].interchange_dim == 8
    _, after = loaded(**call)
    close(after.logits, before.logits, atol=0)


def test_noise_settings_round_trip(gpt2, tmp_path):
    iv = pv.IntervenableModel({"layer": 0, "component": "block_output", "intervention_type": pv.NoiseIntervention},
                              gpt2)
    noise = iv.unique_interventions()[0]
    noise.noise_level, noise.seed = 2.5, 7
    iv.save(str(tmp_path))
    loaded = pv.IntervenableModel.load(str(tmp_path), gpt2).unique_interventions()[0]
    assert (loaded.noise_level, loaded.seed) == (2.5, 7)


# -- 3: hook_dict follows replaced submodules ----------------------------------------------------------------------

def test_hook_dict_sees_a_replaced_block(gpt2):
    model = copy.deepcopy(gpt2)
    before = model.hook_dict  # read once: an old cache kept the replaced block's hook points
    assert "blocks.0.hook_resid_post" in before
    model.blocks[0] = copy.deepcopy(model.blocks[1])
    _, cache = model.run_with_cache(ids())
    in_block = [sorted(k.split(".", 2)[2] for k in cache if k.startswith(f"blocks.{i}.")) for i in (0, 1)]
    assert "hook_resid_post" in in_block[0] and in_block[0] == in_block[1]
    assert model.hook_dict["blocks.0.hook_resid_post"] is model.blocks[0].hook_resid_post
    iv = pv.IntervenableModel({"layer": 0, "component": "block_output", "intervention_type": pv.ZeroIntervention},
                              model)
    _, out = iv({"input_ids": ids()}, unit_locations={"base": 2})
    differs(out.logits, model(ids()).logits)


# -- 4: GRU time steps out of range --------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [5, 7, -1])
@pytest.mark.parametrize("side", ["base", "sources->base"])
def test_gru_time_step_out_of_range_is_an_error(step, side):
    iv = pv.IntervenableModel({"layer": 0, "component": "cell_output", "unit": "t"}, tiny_gru())
    x = torch.randint(0, 101, (1, 5))
    with pytest.raises(ValueError, match=rf"time step {step} is out of range; this input has 5 time steps"):
        iv({"input_ids": x}, [{"input_ids": x.flip(1)}], unit_locations={side: step})


# -- 5: T5 in float16 ----------------------------------------------------------------------------------------------

def test_t5_fp16_clamps_like_transformers():
    """Weights large enough to overflow float16 in the residual stream: transformers clamps and stays finite;
    so does hookvene, and their logits agree."""
    hf = tiny_t5()
    with torch.no_grad():
        for block in hf.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(30000.0)  # 3e3 stays finite unclamped; 1e5 is NaN in HF
    hf = hf.half()
    model = pv.from_pretrained(hf)
    x, dec = torch.randint(1, 101, (2, 7)), torch.randint(1, 101, (2, 3))
    with torch.no_grad():
        want = hf(input_ids=x, decoder_input_ids=dec).logits
        got = model(input_ids=x, decoder_input_ids=dec).logits
    assert torch.isfinite(want).all(), "the test must overflow float16 in transformers' run too"
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_t5_clamp_is_only_for_float16():
    from hookvene.models.t5 import clamp_fp16

    x = torch.tensor([1e38, -3.0])
    assert torch.equal(clamp_fp16(x), x)
    h = torch.tensor([float("inf"), -float("inf"), 1.0], dtype=torch.float16)
    big = torch.tensor(torch.finfo(torch.float16).max - 1000).half().item()  # rounded as transformers' clamp
    assert clamp_fp16(h).tolist() == [big, -big, 1.0]


# -- 6: Addition / Subtraction touch only their subspace -----------------------------------------------------------

@pytest.mark.parametrize("cls,sign", [(pv.AdditionIntervention, 1), (pv.SubtractionIntervention, -1)])
def test_add_subtract_leave_other_dims_untouched_even_with_inf(cls, sign):
    base = torch.arange(8.0).view(2, 4)
    source = torch.tensor([[1.0, float("inf"), float("nan"), 2.0]]).expand(2, 4)
    out = cls(embed_dim=4)(base, source, [[0, 3], [0, 3]])
    want = base.clone()
    want[:, [0, 3]] += sign * torch.tensor([1.0, 2.0])
    assert torch.equal(out, want)


# -- 7: threads and re-entrancy ------------------------------------------------------------------------------------

def run_threads(*targets) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)


def test_plain_forward_in_another_thread_is_not_intervened(gpt2):
    x = ids()
    clean = gpt2(x).logits
    iv = pv.IntervenableModel({"layer": 0, "component": "block_output", "intervention_type": pv.ZeroIntervention},
                              gpt2)
    _, zeroed = iv({"input_ids": x})
    wrong, done = [], threading.Event()

    def plain():
        while not done.is_set():
            if not torch.allclose(gpt2(x).logits, clean, atol=1e-5):
                wrong.append("plain")

    def wrapped():
        for _ in range(20):
            if not torch.allclose(iv({"input_ids": x})[1].logits, zeroed.logits, atol=1e-5):
                wrong.append("wrapper")
        done.set()

    run_threads(plain, wrapped, wrapped)
    assert wrong == [] and not gpt2.has_hooks()


def test_one_gru_wrapper_from_two_threads():
    """Unit-t interventions read the hook's time step, which is kept per thread."""
    gru = tiny_gru()
    iv = pv.IntervenableModel({"layer": 1, "component": "cell_output", "unit": "t"}, gru)
    calls = [(torch.randint(0, 101, (2, 6)), torch.randint(0, 101, (2, 6)), t) for t in (1, 4)]
    want = [iv({"input_ids": b}, [{"input_ids": s}], unit_locations={"sources->base": t})[1].logits
            for b, s, t in calls]
    wrong = []

    def worker(k):
        def run():
            b, s, t = calls[k]
            for _ in range(15):
                got = iv({"input_ids": b}, [{"input_ids": s}], unit_locations={"sources->base": t})[1].logits
                if not torch.allclose(got, want[k], atol=1e-6):
                    wrong.append(k)
        return run

    run_threads(worker(0), worker(1))
    assert wrong == [] and not gru.has_hooks()


def test_wrapper_called_inside_another_wrappers_hook_sees_only_its_own(gpt2):
    x, src = ids(), ids(seed=3)
    inner = pv.IntervenableModel({"layer": 1, "component": "mlp_output", "intervention_type": pv.ZeroIntervention},
                                 gpt2)
    _, inner_alone = inner({"input_ids": src})
    seen = []

    def outer_fn(base, source):
        seen.append(inner({"input_ids": src})[1].logits)  # a nested call while the outer hooks are attached
        return torch.zeros_like(base)

    outer = pv.IntervenableModel({"layer": 0, "component": "block_output", "intervention": outer_fn}, gpt2)
    outer({"input_ids": x})
    close(seen[0], inner_alone.logits, atol=0)
    assert not gpt2.has_hooks()


# -- 8, 9: the user's model ----------------------------------------------------------------------------------------

def test_frozen_transformers_model_stays_frozen():
    hf = tiny_gpt2()
    hf.requires_grad_(False)
    hf.transformer.h[0].mlp.c_fc.weight.requires_grad_(True)  # one trainable tensor among frozen ones
    flags = {n: p.requires_grad for n, p in hf.named_parameters()}
    pv.IntervenableModel({"layer": 0, "component": "block_output"}, hf)
    pv.from_pretrained(hf)
    assert {n: p.requires_grad for n, p in hf.named_parameters()} == flags


def test_weights_are_shared_unless_a_copy_is_asked_for():
    hf = tiny_gpt2()
    shared, copied = pv.from_pretrained(hf), pv.from_pretrained(hf, copy=True)
    assert shared.embed.weight is hf.transformer.wte.weight
    assert copied.embed.weight is not hf.transformer.wte.weight
    assert copied.unembed.weight is copied.embed.weight  # the copy keeps the tie
    with torch.no_grad():
        copied.embed.weight.zero_()
    assert hf.transformer.wte.weight.abs().sum() > 0


@pytest.mark.parametrize("method,dtype", [("half", torch.float16), ("double", torch.float64),
                                          ("float", torch.float32), ("to", torch.float64), ("cpu", torch.float32)])
def test_intervenable_model_moves_like_a_module(gpt2, method, dtype):
    model = copy.deepcopy(gpt2)
    iv = pv.IntervenableModel({"layer": 0, "component": "block_output", "low_rank_dimension": 2,
                               "intervention_type": pv.LowRankRotatedSpaceIntervention}, model)
    out = getattr(iv, method)(torch.float64) if method == "to" else getattr(iv, method)()
    assert out is iv
    assert model.embed.weight.dtype == dtype
    assert all(p.dtype == dtype for p in iv.unique_interventions()[0].parameters())


# -- 10: nothing a saved file names is imported or called ----------------------------------------------------------

def test_load_imports_nothing_named_by_the_file(gpt2, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "hv_payload.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = tmp_path / "saved"
    pv.IntervenableModel({"layer": 0, "intervention_type": pv.ZeroIntervention}, gpt2).save(str(saved))
    for name in ("hv_payload:Evil", "os:system", "builtins.eval"):
        edit_config(saved, lambda c, name=name: c["representations"][0].update(intervention_type=name))
        with pytest.raises(ValueError, match=rf"unknown intervention type {name!r}: loading never imports .*"
                                             r"Known types: .*ZeroIntervention"):
            pv.IntervenableModel.load(str(saved), gpt2)
    assert not marker.exists()


def test_lambda_interventions_are_refused_at_save(gpt2, tmp_path):
    iv = pv.IntervenableModel({"layer": 0, "intervention": lambda b, s: b * 2}, gpt2)
    with pytest.raises(ValueError, match=r"given as a function or an object \(function\), which no file can hold"):
        iv.save(str(tmp_path))
    assert not (tmp_path / "config.json").exists()


def test_registered_class_loads_by_name(gpt2, tmp_path):
    class Doubling(pv.ConstantSourceIntervention):
        def forward(self, base, source=None, subspaces=None):
            return base * 2

    pv.IntervenableModel({"layer": 0, "intervention_type": Doubling}, gpt2).save(str(tmp_path))
    with pytest.raises(ValueError, match="unknown intervention type .*Doubling"):
        pv.IntervenableModel.load(str(tmp_path), gpt2)
    loaded = pv.IntervenableModel.load(str(tmp_path), gpt2, intervention_types=[Doubling])
    assert isinstance(loaded.unique_interventions()[0], Doubling)
    pv.register_intervention(Doubling, "test_reliability.Doubling")
    saved = json.loads((tmp_path / "config.json").read_text())
    edit_config(tmp_path, lambda c: c["representations"][0].update(intervention_type="test_reliability.Doubling"))
    try:
        assert isinstance(pv.IntervenableModel.load(str(tmp_path), gpt2).unique_interventions()[0], Doubling)
    finally:
        from hookvene.interventions import INTERVENTION_REGISTRY

        del INTERVENTION_REGISTRY["test_reliability.Doubling"]
    assert saved["representations"][0]["intervention_type"].endswith("Doubling")
    with pytest.raises(ValueError, match="already registered"):
        pv.register_intervention(Doubling, "VanillaIntervention")


# -- 11: pickle checkpoints only on request ------------------------------------------------------------------------

def test_pickle_checkpoint_needs_allow_pickle(tmp_path):
    hf = tiny_gpt2()
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle=True"):
        pv.from_pretrained(str(tmp_path))
    model = pv.from_pretrained(str(tmp_path), allow_pickle=True)
    x = ids()
    with torch.no_grad():
        close(model(x).logits, hf(x).logits, atol=1e-4)


# -- 12: SweepResult.save writes only what load reads --------------------------------------------------------------

def test_sweep_result_refuses_what_load_cannot_read(tmp_path):
    r = SweepResult(torch.zeros(2, 2), "resid_pre", "m", "layer", "pos", ["0", "1"], ["0", "1"],
                    extra={"ok": torch.ones(2), "bad": np.arange(3)})
    with pytest.raises(ValueError, match=r"extra\['bad'\] \(ndarray\) could not be read back"):
        r.save(str(tmp_path / "r.pt"))
    assert not (tmp_path / "r.pt").exists()
    r.extra["bad"] = torch.as_tensor(np.arange(3))
    r.save(str(tmp_path / "r.pt"))
    assert torch.equal(SweepResult.load(str(tmp_path / "r.pt")).extra["bad"], torch.arange(3))


# -- 13: clear errors ----------------------------------------------------------------------------------------------

def test_missing_local_path_is_not_reported_as_a_hub_failure(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        pv.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a checkpoint directory"):
        pv.from_pretrained(str(tmp_path / "file.txt"))


def model_calls():
    import transformers

    neo = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        vocab_size=101, hidden_size=16, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
        max_position_embeddings=32, window_size=4)).eval()
    return {"gpt2": (pv.from_pretrained(tiny_gpt2()), {}), "gpt_neo": (pv.from_pretrained(neo), {}),
            "t5": (pv.from_pretrained(tiny_t5()), {"decoder_input_ids": torch.zeros(2, 2, dtype=torch.long)}),
            "gru": (tiny_gru(), {})}


@pytest.fixture(scope="module")
def models():
    return model_calls()


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo", "t5", "gru"])
@pytest.mark.parametrize("inputs,message", [
    (dict(input_ids=torch.rand(2, 5)), "input_ids must hold integer token ids, got dtype torch.float32"),
    (dict(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 7, dtype=torch.long)),
     r"attention_mask must have shape \(.*got \(2, 7\)"),
    (dict(input_ids=torch.ones(0, 5, dtype=torch.long)), r"input_ids is empty \(shape \(0, 5\)\)"),
    (dict(input_ids=torch.ones(2, 0, dtype=torch.long)), r"input_ids is empty \(shape \(2, 0\)\)"),
], ids=["float_ids", "mask_length", "empty_batch", "empty_sequence"])
def test_bad_model_inputs(models, arch, inputs, message):
    model, extra = models[arch]
    if inputs["input_ids"].shape[0] == 0:
        extra = {k: v[:0] for k, v in extra.items()}
    with pytest.raises(ValueError, match=message):
        model(**inputs, **extra)


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_k=0), "top_k must be a positive int"), (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]")])
def test_bad_sampling_settings(gpt2, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gpt2.generate(ids(), max_new_tokens=2, do_sample=True, **kwargs)


@pytest.mark.parametrize("layer", ["0", 1.0, True])
def test_layer_must_be_an_int(gpt2, layer):
    with pytest.raises(TypeError, match=rf"layer must be an int \(a block index\), got {type(layer).__name__}"):
        pv.IntervenableModel({"layer": layer, "component": "block_output"}, gpt2)


def test_bad_names_filter_and_low_rank(gpt2):
    with pytest.raises(TypeError, match="hook names are strings such as .*, got int 3"):
        gpt2.run_with_cache(ids(), names_filter=[3])
    with pytest.raises(TypeError, match="names must be a hook name, a list of hook names, a predicate or None"):
        gpt2.run_with_cache(ids(), names_filter=3)
    for k in (0, -2):
        with pytest.raises(ValueError, match=rf"low_rank_dimension, a positive int .* got {k}"):
            pv.IntervenableModel({"layer": 0, "low_rank_dimension": k,
                                  "intervention_type": pv.LowRankRotatedSpaceIntervention}, gpt2)
    assert not gpt2.has_hooks()


def test_negative_per_example_positions_in_activation_patch(gpt2):
    metric = lambda: metrics.logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4]), pos=torch.tensor([-1, 4]))
    with pytest.raises(ValueError, match=r"absolute positions >= 0 .* got \[-1, 4\]"):
        activation_patch(gpt2, ids(), ids(seed=4), metric(), kind="resid_pre")
    with pytest.raises(ValueError, match="per-example position 9 is out of range for 6 positions"):
        activation_patch(gpt2, ids(), ids(seed=4), metrics.logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4]),
                                                                      pos=torch.tensor([9, 4])), kind="resid_pre")


@pytest.mark.parametrize("argv,message", [
    (["--threads", "-1", "info"], "argument --threads: must be at least 1, got -1"),
    (["trace", "--prompt", "a b", "--subject", "a", "--target", " b", "--samples", "0"],
     "argument --samples: must be at least 1, got 0")])
def test_cli_rejects_bad_counts(argv, message, capsys):
    from hookvene.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_causal_trace_needs_samples(gpt2):
    from hookvene.experiments import causal_trace

    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        causal_trace(gpt2, ids(1), subject=[1], target=3, n_samples=0)


def test_readme_guarantees_name_real_tests():
    """Every test the README's "Guarantees" section cites exists here (a renamed test must update the README)."""
    import re
    from pathlib import Path

    root = Path(__file__).parent
    readme = (root.parent / "README.md").read_text()
    section = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    cited = set(re.findall(r"`(test_\w+)`", section))
    defined = set(re.findall(r"^def (test_\w+)", (root / "test_reliability.py").read_text(), flags=re.M))
    assert cited and cited <= defined, sorted(cited - defined)
    assert "tests/test_randomized.py" in section and (root / "test_randomized.py").exists()
