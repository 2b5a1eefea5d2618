"""Tests written for mutants of hookvene/interventions.py that survived tests/test_interventions.py
(mutation/REPORT.md).

Each test pins a behaviour the unit tests left open: keyword arguments read under their names, the `interchange_dim`
mask, dtype and device of the output (a meta-device base stands in for an accelerator: a tensor left on the CPU
cannot mix with it), per-example and per-unit subspace rows, partition formats, the bounds of subspace indices,
initial values of trainable parameters, and the exact error messages.
"""

import json

import pytest
import torch
from torch import nn

import hookvene.interventions as ivs
from hookvene.interventions import (
    AdditionIntervention,
    BoundlessRotatedSpaceIntervention,
    CollectIntervention,
    Intervention,
    LambdaIntervention,
    LowRankRotatedSpaceIntervention,
    NoiseIntervention,
    RotatedSpaceIntervention,
    SigmoidMaskIntervention,
    SigmoidMaskRotatedSpaceIntervention,
    SubspaceIndexError,
    VanillaIntervention,
    ZeroIntervention,
    build_intervention,
    sigmoid_boundary,
)


def _pair(*shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def test_keywords_are_read_by_name():
    iv = Intervention(embed_dim=6, keep_last_dim=True, use_fast=True, hidden_source_representation=True)
    assert (iv.embed_dim, iv.interchange_dim, iv.keep_last_dim, iv.use_fast) == (6, 6, True, True)
    assert iv.is_source_constant
    plain = Intervention()
    assert (plain.embed_dim, plain.interchange_dim, plain.keep_last_dim, plain.use_fast) == (None, None, False, False)
    assert not plain.is_source_constant


@pytest.mark.parametrize("shape", [(2, 6), (2, 3, 6)])
def test_interchange_dim_masks_the_leading_dims(shape):
    base, source = _pair(*shape)
    iv = VanillaIntervention(embed_dim=6)
    iv.set_interchange_dim(2)
    assert iv.interchange_dim == 2 and iv.settings() == {"interchange_dim": 2}
    out = iv(base, source)
    assert torch.equal(out[..., :2], source[..., :2]) and torch.equal(out[..., 2:], base[..., 2:])
    iv.set_interchange_dim(6)  # the whole width: a plain swap
    assert torch.equal(iv(base, source), source)
    iv.apply_settings({"interchange_dim": 1})
    assert iv.interchange_dim == 1
    assert torch.equal(iv(base, source)[..., 1:], base[..., 1:])


def test_apply_settings_refuses_unknown_ones_by_name():
    with pytest.raises(ValueError, match=r"^VanillaIntervention has no setting\(s\) \['bogus'\]; its settings are "
                                         r"\['interchange_dim'\]$"):
        VanillaIntervention().apply_settings({"bogus": 1})


def test_source_takes_base_dtype():
    base, source = _pair(2, 3, 4, dtype=torch.float64)
    assert VanillaIntervention()(base, source.float(), [[1]]).dtype == torch.float64
    assert VanillaIntervention()(base, source.float()).dtype == torch.float64  # a full swap returns the source


def test_an_int_subspace_is_one_dim_for_everything():
    base, source = _pair(2, 3, 4)
    out = VanillaIntervention()(base, source, 1)
    assert torch.equal(out, torch.where(torch.arange(4) == 1, source, base))


def test_noise_apply_settings():
    iv = NoiseIntervention(embed_dim=4, noise_level=0.2, seed=1)
    iv.apply_settings({"interchange_dim": 2, "noise_level": 0.5, "seed": 3})
    assert (iv.interchange_dim, iv.noise_level, iv.seed) == (2, 0.5, 3)
    assert torch.equal(iv(torch.zeros(1, 4)), NoiseIntervention(embed_dim=4, noise_level=0.5, seed=3)(
        torch.zeros(1, 4)) * torch.tensor([1.0, 1, 0, 0]))
    iv.apply_settings({})  # nothing given: nothing changes
    assert (iv.interchange_dim, iv.noise_level, iv.seed) == (2, 0.5, 3)
    assert iv.settings() == {"interchange_dim": 2, "noise_level": 0.5, "seed": 3}  # the names save/load write


@pytest.mark.parametrize("make,subspaces", [(VanillaIntervention, None), (VanillaIntervention, [[1]]),
                                            (AdditionIntervention, [[0, 1]]), (ZeroIntervention, None),
                                            (NoiseIntervention, [[1]]), (CollectIntervention, [[0], [2]])])
def test_output_lives_on_base_device(make, subspaces):
    """A base on the meta device (as on an accelerator) with a CPU source: masks, indices, noise and source all
    move to the base's device."""
    iv = make(embed_dim=4)
    iv.set_interchange_dim(2)
    base = torch.empty(2, 3, 4, device="meta", dtype=torch.float64)
    out = iv(base, torch.randn(2, 3, 4), subspaces)
    assert out.device.type == "meta"
    if make is not CollectIntervention:
        assert out.dtype == torch.float64


def test_source_width_error_names_both_widths():
    with pytest.raises(ValueError, match=r"^source width 3 does not match the intervened representation's width 4 "
                                         r"\(shape \(2, 5, 4\)\)$"):
        VanillaIntervention()(torch.zeros(2, 5, 4), torch.zeros(2, 5, 3))


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 3, 5, 4)])
def test_one_source_vector_per_example(shape):
    base = torch.zeros(shape)
    source = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])
    out = VanillaIntervention()(base, source)
    want = source.view(2, *[1] * (len(shape) - 2), 4).expand(shape)
    assert torch.equal(out, want)


def test_int_subspace_rows_one_per_example():
    base, source = _pair(2, 4)
    out = VanillaIntervention()(base, source, [1, 2])
    assert torch.equal(out[0], torch.where(torch.arange(4) == 1, source[0], base[0]))
    assert torch.equal(out[1], torch.where(torch.arange(4) == 2, source[1], base[1]))


def test_partition_formats():
    iv = Intervention(subspace_partition=[[0, 2], [2, 3, 5], range(5, 7), (7, 8)])
    assert iv.subspace_dims([0], 8) == [0, 1]  # [a, b]: the half-open range a..b-1
    assert iv.subspace_dims([1], 8) == [2, 3, 5]  # a longer list: explicit dims
    assert iv.subspace_dims([2], 8) == [5, 6]  # a range: explicit
    assert iv.subspace_dims([3], 8) == [7]
    assert iv.subspace_dims(1, 8) == [2, 3, 5]  # an int: one partition id


def test_subspace_index_bounds():
    iv = Intervention()
    assert iv.subspace_dims([-4, -1, 0, 3], 4) == [0, 3, 0, 3]
    for bad in (-5, 4):
        with pytest.raises(SubspaceIndexError, match=rf"^subspace index {bad} out of range for a 4-dimensional "):
            iv.subspace_dims([bad], 4)


def test_use_fast_applies_the_first_row_to_every_example():
    base, source = _pair(2, 4)
    out = VanillaIntervention(use_fast=True)(base, source, [[0], [1]])
    assert torch.equal(out[:, 0], source[:, 0]) and torch.equal(out[:, 1:], base[:, 1:])


def test_one_subspace_row_per_unit_on_a_direct_call():
    base, source = _pair(2, 3, 4)
    out = VanillaIntervention()(base, source, [[0], [1], [2]])  # 3 rows: the units, not the 2 examples
    for u in range(3):
        keep = torch.arange(4) == u
        assert torch.equal(out[:, u], torch.where(keep, source[:, u], base[:, u]))
    with pytest.raises(ValueError, match=r"^subspaces have 5 rows for a representation of shape \(2, 3, 4\): give one "
                                         r"row for all, one per example \(2\) or, calling the intervention directly, "
                                         r"one per unit \(3\)$"):
        VanillaIntervention()(base, source, [[0]] * 5)


def test_collect_rows_must_select_as_many_dims():
    with pytest.raises(ValueError, match=r"^CollectIntervention returns one tensor, so every subspace row must select "
                                         r"the same number of dims; got \[1, 2\] dims"):
        CollectIntervention()(torch.zeros(2, 4), None, [[0], [1, 2]])


def test_noise_reseed_takes_the_new_seed():
    iv = NoiseIntervention(seed=1)
    iv.reseed(5)
    base = torch.zeros(2, 4)
    assert iv.seed == 5 and torch.equal(iv(base), NoiseIntervention(seed=5)(base))
    iv.reseed()  # no argument: restart the current seed's draws
    assert iv.seed == 5 and torch.equal(iv(base), NoiseIntervention(seed=5)(base))


@pytest.mark.parametrize("cls", [RotatedSpaceIntervention, LowRankRotatedSpaceIntervention,
                                 BoundlessRotatedSpaceIntervention, SigmoidMaskRotatedSpaceIntervention,
                                 SigmoidMaskIntervention])
def test_float64_activations_stay_float64(cls):
    iv = cls(embed_dim=4, low_rank_dimension=2)
    base, source = _pair(2, 4, dtype=torch.float64)
    assert iv(base, source).dtype == torch.float64


@pytest.mark.parametrize("cls", [RotatedSpaceIntervention, LowRankRotatedSpaceIntervention,
                                 BoundlessRotatedSpaceIntervention, SigmoidMaskIntervention])
def test_missing_embed_dim_names_the_class(cls):
    with pytest.raises(ValueError, match=rf"^{cls.__name__} needs embed_dim"):
        cls(low_rank_dimension=2)


@pytest.mark.parametrize("k", [None, True, 0, -1, 2.0, "2"])
def test_low_rank_needs_a_positive_int(k):
    with pytest.raises(ValueError, match=rf"needs low_rank_dimension, a positive int .* got {k!r}$"):
        LowRankRotatedSpaceIntervention(embed_dim=4, low_rank_dimension=k)


def test_low_rank_interchange_dim_is_the_rank():
    iv = LowRankRotatedSpaceIntervention(embed_dim=6, low_rank_dimension=2)
    assert iv.interchange_dim == 2 and iv.settings() == {"interchange_dim": 2}


def test_sigmoid_boundary_formula():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    lo, hi, t = 1.0, 2.5, 0.5
    want = torch.sigmoid((x - lo) / t) * torch.sigmoid((hi - x) / t)
    assert torch.allclose(sigmoid_boundary(x, lo, hi, t), want)


def test_initial_values_of_the_soft_interventions():
    b = BoundlessRotatedSpaceIntervention(embed_dim=4)
    assert b.get_temperature().item() == 50.0 and b.get_boundary_parameters().tolist() == [0.5]
    assert b.intervention_population.dtype == torch.float32 and b.intervention_population.tolist() == [0, 1, 2, 3]
    assert "intervention_population" not in b.state_dict()  # derived, not saved
    s = SigmoidMaskRotatedSpaceIntervention(embed_dim=4)
    assert s.get_boundary_parameters().tolist() == [100.0] * 4
    b.set_intervention_boundaries(3.0)  # beta is clamped to 1: at most every dim
    assert torch.allclose(b.mask(4), sigmoid_boundary(torch.arange(4.0), 0.0, 4.0, torch.tensor(50.0)))
    b.set_intervention_boundaries(-1.0)  # ... and at least 1e-3
    assert torch.allclose(b.mask(4), sigmoid_boundary(torch.arange(4.0), 0.0, 4e-3, torch.tensor(50.0)))


def test_soft_mask_spans_the_last_dim_on_a_direct_call():
    iv = BoundlessRotatedSpaceIntervention(embed_dim=4)
    base, source = _pair(2, 3, 4)
    assert iv(base, source).shape == (2, 3, 4)


def test_lambda_gets_the_source_and_subspaces():
    seen = []
    iv = LambdaIntervention(lambda b, s, sub: seen.append((s, sub)) or b)
    src = torch.ones(1, 2)
    iv(torch.zeros(1, 2), src, [[0]])
    assert seen[0][0] is src and seen[0][1] == [[0]]


def test_build_intervention_from_a_function():
    f = lambda b, s: b + s  # noqa: E731
    iv = build_intervention(f, embed_dim=3)
    assert isinstance(iv, LambdaIntervention) and iv.fn is f and iv.embed_dim == 3 and not iv.is_source_constant
    const = build_intervention(f, source_representation=torch.ones(3))
    assert const.is_source_constant
    assert build_intervention(VanillaIntervention, embed_dim=3).embed_dim == 3
    with pytest.raises(ValueError, match=r"^not an intervention: 3 \(give an Intervention class, object, or a "
                                         r"function\)$"):
        build_intervention(3)


# --- the registry of classes a saved config may name -----------------------------------------------------------


class _Mine(VanillaIntervention):
    pass


def test_register_intervention(monkeypatch):
    monkeypatch.setattr(ivs, "INTERVENTION_REGISTRY", dict(ivs.INTERVENTION_REGISTRY))
    assert ivs.register_intervention(_Mine) is _Mine and ivs.INTERVENTION_REGISTRY["_Mine"] is _Mine
    assert ivs.register_intervention(_Mine) is _Mine  # again: fine
    assert ivs.register_intervention(_Mine, name="mine.v2") is _Mine and ivs.INTERVENTION_REGISTRY["mine.v2"] is _Mine
    with pytest.raises(ValueError, match=r"^'_Mine' is already registered for tests.test_mutants_interventions._Mine; "
                                         r"register Other under another name$"):
        ivs.register_intervention(type("Other", (VanillaIntervention,), {}), name="_Mine")
    with pytest.raises(TypeError, match=r"^register_intervention takes an intervention class \(an nn.Module "
                                        r"subclass\), got 3$"):
        ivs.register_intervention(3)
    with pytest.raises(TypeError, match=r"^register_intervention takes an intervention class"):
        ivs.register_intervention(int)
    with pytest.raises(TypeError, match=r"^a LambdaIntervention wraps a function, which a saved file cannot name; it "
                                        r"cannot be registered$"):
        ivs.register_intervention(type("L", (LambdaIntervention,), {}))


@pytest.mark.parametrize("saved", ["hookvene.interventions:VanillaIntervention", "VanillaIntervention",
                                   "<class 'hookvene.interventions.VanillaIntervention'>"])
def test_intervention_class_reads_every_format(saved):
    assert ivs.intervention_class(saved) is VanillaIntervention


def test_intervention_class_extra_and_errors(monkeypatch):
    monkeypatch.setattr(ivs, "INTERVENTION_REGISTRY", {"A": VanillaIntervention, "x.B": ZeroIntervention})
    assert ivs.intervention_class("x.B") is ZeroIntervention  # a registered name with a dot in it
    for saved in ("_Mine", "tests.test_mutants_interventions:_Mine", "tests.test_mutants_interventions._Mine",
                  "<class 'tests.test_mutants_interventions._Mine'>"):
        assert ivs.intervention_class(saved, extra=[_Mine]) is _Mine, saved
    with pytest.raises(ValueError, match=r"^the saved config names a LambdaIntervention, which wraps a function that "
                                         r"no file can hold; build the IntervenableModel"):
        ivs.intervention_class("hookvene.interventions:LambdaIntervention")
    with pytest.raises(TypeError, match=r"^intervention_types passed to load must be classes, got 3$"):
        ivs.intervention_class("Nope", extra=[3])
    with pytest.raises(ValueError, match=r"^unknown intervention type 'Nope': loading never imports classes named by a "
                                         r"file. Known types: A, x.B, _Mine. For your own class"):
        ivs.intervention_class("Nope", extra=[_Mine])
    assert not isinstance(_Mine, nn.Module)


@pytest.mark.parametrize("latent_dim", [0, -1, True, 2.0, None])
def test_autoencoder_needs_a_positive_latent_dim(latent_dim):
    with pytest.raises(ValueError, match=rf"^AutoencoderIntervention needs latent_dim, a positive int \(the SAE's "
                                         rf"number of features\), got {latent_dim!r}$"):
        ivs.AutoencoderIntervention(embed_dim=4, latent_dim=latent_dim)
    assert ivs.AutoencoderIntervention(embed_dim=4, latent_dim=1).autoencoder is not None


# -- the autoencoder interventions (pyvene's AutoencoderIntervention and JumpReLUAutoencoderIntervention) --------

@pytest.mark.parametrize("cls, size", [(ivs.AutoencoderIntervention, {"latent_dim": 4}),
                                       (ivs.JumpReLUAutoencoderIntervention, {"low_rank_dimension": 4})])
def test_autoencoders_name_themselves_when_embed_dim_is_missing(cls, size):
    with pytest.raises(ValueError, match=rf"^{cls.__name__} needs embed_dim"):
        cls(**size)


@pytest.mark.parametrize("cls, size", [(ivs.AutoencoderIntervention, "latent_dim"),
                                       (ivs.JumpReLUAutoencoderIntervention, "low_rank_dimension")])
def test_autoencoders_name_themselves_when_the_feature_count_is_missing(cls, size):
    with pytest.raises(ValueError, match=rf"^{cls.__name__} needs {size}, a positive int"):
        cls(embed_dim=6)


def _autoencoder(seed=0):
    torch.manual_seed(seed)
    iv = ivs.AutoencoderIntervention(embed_dim=6, latent_dim=5)
    with torch.no_grad():  # pyvene's Linear init, plus a non-zero decoder bias so `x - b_dec` matters
        iv.autoencoder.decoder[0].bias.normal_()
    return iv


def test_autoencoder_layer_forward_returns_latent_and_reconstruction():
    ae = _autoencoder().autoencoder
    x = torch.randn(3, 6)
    out = ae(x)
    assert set(out) == {"latent", "output"}
    enc, dec = ae.encoder[0], ae.decoder[0]
    latent = torch.relu((x - dec.bias) @ enc.weight.T + enc.bias)
    torch.testing.assert_close(out["latent"], latent, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["output"], latent @ dec.weight.T + dec.bias, rtol=0, atol=1e-6)
    assert enc.bias is not None and dec.bias is not None  # both Linear layers carry a bias, as pyvene's do


def test_autoencoder_subspaces_covering_every_feature_give_the_source_reconstruction():
    iv = _autoencoder()
    base, source = _pair(2, 6)
    out = iv(base, source, subspaces=[list(range(5))] * 2)  # every latent: subspace_mask is None
    torch.testing.assert_close(out, iv.autoencoder.decode(iv.autoencoder.encode(source)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim", [[1, 3], (1, 3), torch.tensor([1, 3])])
def test_autoencoder_interchange_dim_as_a_list_tuple_or_tensor(dim):
    iv = _autoencoder()
    iv.set_interchange_dim(dim)
    base, source = _pair(2, 6)
    ae = iv.autoencoder
    zb, zs = ae.encode(base), ae.encode(source)
    zb[:, [1, 3]] = zs[:, [1, 3]]
    torch.testing.assert_close(iv(base, source), ae.decode(zb), rtol=0, atol=1e-6)
    setting = iv.settings()["interchange_dim"]  # JSON-ready: a tensor becomes a list
    assert list(setting) == [1, 3] and json.loads(json.dumps(setting)) == [1, 3]


def test_autoencoders_return_the_base_dtype():
    """Parameters in float32, activations in float64: the inputs are cast to the parameters' dtype (a float64 input
    cannot meet float32 weights in a matmul) and the output back to the base's dtype."""
    base, source = _pair(2, 6, dtype=torch.float64)
    iv = _autoencoder()
    iv.set_interchange_dim([0, 2])
    out = iv(base, source)
    assert out.dtype == torch.float64
    jr = ivs.JumpReLUAutoencoderIntervention(embed_dim=6, low_rank_dimension=4)
    with torch.no_grad():
        for p in jr.parameters():
            p.normal_()
    out = jr(base, source)
    assert out.dtype == torch.float64
    want = jr.decode(jr.encode(source.float()))  # no subspaces: every feature from the source
    torch.testing.assert_close(out, want.double(), rtol=0, atol=1e-6)


def test_jumprelu_threshold_is_strict():
    """SAELens's JumpReLU: z = pre * (pre > threshold); a pre-activation equal to its threshold gives 0."""
    jr = ivs.JumpReLUAutoencoderIntervention(embed_dim=3, low_rank_dimension=2)
    with torch.no_grad():
        jr.b_enc.copy_(torch.tensor([0.5, 0.75]))
        jr.threshold.copy_(torch.tensor([0.5, 0.25]))  # feature 0 sits exactly at its threshold
    z = jr.encode(torch.zeros(1, 3))
    assert z.tolist() == [[0.0, 0.75]]
