"""Intervention classes on small hand-made tensors: each formula checked against a hand computation, plus the
shared contract (no in-place edits of inputs, clear ValueErrors for bad subspaces, source widths, missing sources)."""

import pytest
import torch

import hookvene as pv

ATOL = 1e-5


def bs(shape=(2, 3, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# -- Vanilla / Skip --------------------------------------------------------------------------------------------------


def test_vanilla_full_swap_returns_source():
    b, s = bs()
    out = pv.VanillaIntervention(embed_dim=6)(b, s)
    assert torch.equal(out, s)


def test_vanilla_subspace_swaps_only_those_dims():
    b, s = bs()
    out = pv.VanillaIntervention(embed_dim=6)(b, s, subspaces=[[1, 4]])
    expect = b.clone()
    expect[..., [1, 4]] = s[..., [1, 4]]
    assert torch.equal(out, expect)


def test_vanilla_subspace_partition_ids():
    b, s = bs()
    iv = pv.VanillaIntervention(embed_dim=6, subspace_partition=[[0, 2], [2, 5], [5, 6]])
    out = iv(b, s, subspaces=[[1]])
    expect = b.clone()
    expect[..., 2:5] = s[..., 2:5]
    assert torch.equal(out, expect)
    out2 = iv(b, s, subspaces=[[0, 2]])  # two partition ids: [0, 2) and [5, 6)
    expect2 = b.clone()
    expect2[..., [0, 1, 5]] = s[..., [0, 1, 5]]
    assert torch.equal(out2, expect2)


def test_vanilla_per_example_subspaces_apply_per_example():
    """hookvene departs from pyvene's union behaviour: row i of subspaces is example i's dims."""
    b, s = bs((2, 1, 8))
    out = pv.VanillaIntervention(embed_dim=8)(b, s, subspaces=[[1, 2], [5, 6]])
    expect = b.clone()
    expect[0, :, [1, 2]] = s[0, :, [1, 2]]
    expect[1, :, [5, 6]] = s[1, :, [5, 6]]
    assert torch.equal(out, expect)


def test_vanilla_constant_source_vector_broadcasts():
    b, _ = bs()
    const = torch.arange(6.0)
    iv = pv.VanillaIntervention(embed_dim=6, source_representation=const)
    assert iv.is_source_constant
    out = iv(b)
    assert torch.equal(out, const.expand_as(b))


def test_skip_is_an_interchange_of_the_given_source():
    b, s = bs()
    iv = pv.SkipIntervention(embed_dim=6)
    assert iv.uses_module_input
    assert torch.equal(iv(b, s), s)
    expect = b.clone()
    expect[..., 0] = s[..., 0]
    assert torch.equal(iv(b, s, subspaces=[[0]]), expect)


# -- Addition / Subtraction / Zero -----------------------------------------------------------------------------------


def test_addition():
    b, s = bs()
    iv = pv.AdditionIntervention(embed_dim=6)
    assert torch.allclose(iv(b, s), b + s, atol=ATOL)
    expect = b.clone()
    expect[..., [0, 3]] += s[..., [0, 3]]
    assert torch.allclose(iv(b, s, subspaces=[[0, 3]]), expect, atol=ATOL)


def test_addition_of_a_vector_to_every_unit():
    b, _ = bs()
    v = torch.linspace(-1, 1, 6)
    assert torch.allclose(pv.AdditionIntervention(embed_dim=6)(b, v), b + v, atol=ATOL)


def test_subtraction():
    b, s = bs()
    iv = pv.SubtractionIntervention(embed_dim=6)
    assert torch.allclose(iv(b, s), b - s, atol=ATOL)
    expect = b.clone()
    expect[..., [2]] -= s[..., [2]]
    assert torch.allclose(iv(b, s, subspaces=[[2]]), expect, atol=ATOL)


def test_zero():
    b, _ = bs()
    iv = pv.ZeroIntervention(embed_dim=6)
    assert iv.is_source_constant
    assert torch.equal(iv(b), torch.zeros_like(b))
    expect = b.clone()
    expect[..., [1, 5]] = 0
    assert torch.equal(iv(b, subspaces=[[1, 5]]), expect)


def test_zero_with_partition():
    b, _ = bs()
    out = pv.ZeroIntervention(embed_dim=6, subspace_partition=[[0, 3], [3, 6]])(b, subspaces=[[1]])
    assert torch.equal(out[..., :3], b[..., :3])
    assert torch.equal(out[..., 3:], torch.zeros_like(b[..., 3:]))


# -- Collect -----------------------------------------------------------------------------------------------------------


def test_collect_returns_base():
    b, _ = bs()
    assert torch.equal(pv.CollectIntervention(embed_dim=6)(b), b)


def test_collect_subspace_selection():
    b, _ = bs()
    iv = pv.CollectIntervention(embed_dim=6)
    out = iv(b, subspaces=[[0, 5]])
    assert out.shape == (2, 3, 2)
    assert torch.equal(out, b[..., [0, 5]])
    per_example = iv(b, subspaces=[[0, 1], [4, 5]])
    assert torch.equal(per_example[0], b[0][..., [0, 1]])
    assert torch.equal(per_example[1], b[1][..., [4, 5]])


# -- Noise -------------------------------------------------------------------------------------------------------------


def test_noise_scale_and_seed():
    b, _ = bs((2, 7, 5))
    iv = pv.NoiseIntervention(embed_dim=5, noise_level=2.0, seed=3)
    out = iv(b)
    expect_noise = torch.randn((2, 7, 5), generator=torch.Generator().manual_seed(3))
    assert torch.allclose((out - b) / 2.0, expect_noise, atol=ATOL)


def test_noise_default_level_is_pyvenes():
    b = torch.zeros(1, 4, 5)
    out = pv.NoiseIntervention(embed_dim=5)(b)
    expect = torch.randn((1, 4, 5), generator=torch.Generator().manual_seed(0)) * 0.13462981581687927
    assert torch.allclose(out, expect, atol=ATOL)


def test_noise_reproducible_and_fresh():
    b, _ = bs((1, 4, 5))
    a1 = pv.NoiseIntervention(embed_dim=5, seed=7)
    a2 = pv.NoiseIntervention(embed_dim=5, seed=7)
    first = a1(b)
    assert torch.equal(first, a2(b))  # a new instance replays the same draws
    second = a1(b)
    assert not torch.equal(first, second)  # fresh noise on the next call
    a1.reseed()
    assert torch.equal(a1(b), first)  # reseed restarts the stream
    assert not torch.equal(pv.NoiseIntervention(embed_dim=5, seed=8)(b), first)


@pytest.mark.parametrize("n_units", [1, 3, 4, 9])
def test_noise_any_number_of_units(n_units):
    b = torch.zeros(2, n_units, 5)
    out = pv.NoiseIntervention(embed_dim=5, noise_level=1.0)(b)
    assert out.shape == b.shape
    assert (out != 0).all()


def test_noise_subspace_mask():
    b, _ = bs((2, 4, 6))
    out = pv.NoiseIntervention(embed_dim=6, noise_level=1.0)(b, subspaces=[[1, 3]])
    keep = [0, 2, 4, 5]
    assert torch.equal(out[..., keep], b[..., keep])
    assert (out[..., [1, 3]] != b[..., [1, 3]]).all()


def test_noise_legacy_kwarg():
    b = torch.zeros(1, 2, 3)
    out = pv.NoiseIntervention(embed_dim=3, noise_leve=0.0)(b)
    assert torch.equal(out, b)


# -- rotations ---------------------------------------------------------------------------------------------------------


def weight_of(iv):
    return iv.rotate_layer.weight.detach()


def test_rotated_space_full_swap_returns_source():
    b, s = bs((3, 8))
    iv = pv.RotatedSpaceIntervention(embed_dim=8)
    assert torch.allclose(iv(b, s), s, atol=ATOL)


def test_rotated_space_partial_swap_by_hand():
    b, s = bs((3, 8))
    iv = pv.RotatedSpaceIntervention(embed_dim=8)
    w = weight_of(iv)
    assert torch.allclose(w @ w.T, torch.eye(8), atol=ATOL)
    rb, rs = b @ w, s @ w
    rb[..., [0, 1, 2]] = rs[..., [0, 1, 2]]
    expect = rb @ w.T
    out = iv(b, s, subspaces=[[0, 1, 2]])
    assert torch.allclose(out, expect, atol=ATOL)
    assert not torch.allclose(out, s, atol=1e-3) and not torch.allclose(out, b, atol=1e-3)


def test_rotated_space_per_example_subspaces():
    b, s = bs((2, 6))
    iv = pv.RotatedSpaceIntervention(embed_dim=6)
    w = weight_of(iv)
    rb, rs = b @ w, s @ w
    rb[0, [0]] = rs[0, [0]]
    rb[1, [4, 5]] = rs[1, [4, 5]]
    assert torch.allclose(iv(b, s, subspaces=[[0], [4, 5]]), rb @ w.T, atol=ATOL)


def test_rotated_space_partition():
    b, s = bs((2, 6))
    iv = pv.RotatedSpaceIntervention(embed_dim=6, subspace_partition=[[0, 2], [2, 6]])
    w = weight_of(iv)
    rb, rs = b @ w, s @ w
    rb[..., 2:6] = rs[..., 2:6]
    assert torch.allclose(iv(b, s, subspaces=[[1]]), rb @ w.T, atol=ATOL)


def test_rotation_stays_orthogonal_after_an_optimizer_step():
    b, s = bs((4, 8))
    iv = pv.RotatedSpaceIntervention(embed_dim=8)
    w0 = weight_of(iv).clone()
    opt = torch.optim.SGD(iv.parameters(), lr=0.5)
    target = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    loss = ((iv(b, s, subspaces=[[0, 1]]) - target) ** 2).sum()
    loss.backward()
    opt.step()
    w1 = weight_of(iv)
    assert not torch.allclose(w0, w1, atol=1e-4)  # it did move
    assert torch.allclose(w1 @ w1.T, torch.eye(8), atol=1e-4)


def test_low_rank_formula():
    b, s = bs((3, 8))
    iv = pv.LowRankRotatedSpaceIntervention(embed_dim=8, low_rank_dimension=3)
    w = weight_of(iv)
    assert w.shape == (8, 3)
    assert torch.allclose(w.T @ w, torch.eye(3), atol=ATOL)
    expect = b + ((s - b) @ w) @ w.T
    assert torch.allclose(iv(b, s), expect, atol=ATOL)


def test_low_rank_subspace_uses_selected_columns():
    b, s = bs((3, 8))
    iv = pv.LowRankRotatedSpaceIntervention(embed_dim=8, low_rank_dimension=3)
    w = weight_of(iv)[:, [0, 2]]
    expect = b + ((s - b) @ w) @ w.T
    assert torch.allclose(iv(b, s, subspaces=[[0, 2]]), expect, atol=ATOL)


def test_low_rank_subspace_partition_ids_index_columns():
    b, s = bs((2, 8))
    iv = pv.LowRankRotatedSpaceIntervention(embed_dim=8, low_rank_dimension=4, subspace_partition=[[0, 1], [1, 4]])
    w = weight_of(iv)[:, 1:4]
    expect = b + ((s - b) @ w) @ w.T
    assert torch.allclose(iv(b, s, subspaces=[[1]]), expect, atol=ATOL)


def test_low_rank_needs_rank():
    with pytest.raises(ValueError, match="low_rank_dimension"):
        pv.LowRankRotatedSpaceIntervention(embed_dim=8)


def test_rotations_need_embed_dim():
    with pytest.raises(ValueError, match="embed_dim"):
        pv.RotatedSpaceIntervention()


def test_boundless_formula_with_given_temperature():
    b, s = bs((3, 10))
    iv = pv.BoundlessRotatedSpaceIntervention(embed_dim=10)
    iv.set_temperature(0.7)
    iv.set_intervention_boundaries(0.4)
    assert float(iv.get_temperature()) == pytest.approx(0.7)
    w = weight_of(iv)
    i = torch.arange(10.0)
    m = torch.sigmoid(i / 0.7) * torch.sigmoid((0.4 * 10 - i) / 0.7)
    expect = ((1 - m) * (b @ w) + m * (s @ w)) @ w.T
    assert torch.allclose(iv(b, s), expect, atol=ATOL)
    # temperature is a buffer (not trainable); the boundary is
    names = {n for n, _ in iv.named_parameters()}
    assert "intervention_boundaries" in names and "temperature" not in names


def test_sigmoid_mask_rotated_space():
    b, s = bs((3, 6))
    iv = pv.SigmoidMaskRotatedSpaceIntervention(embed_dim=6)
    with torch.no_grad():
        iv.masks.copy_(torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0]))
    iv.set_temperature(2.0)
    w = weight_of(iv)
    m = torch.sigmoid(iv.masks.detach() / 2.0)
    expect = ((1 - m) * (b @ w) + m * (s @ w)) @ w.T
    assert torch.allclose(iv(b, s), expect, atol=ATOL)
    assert iv.get_boundary_parameters() is iv.masks


def test_sigmoid_mask():
    b, s = bs((2, 3, 4))
    iv = pv.SigmoidMaskIntervention(embed_dim=4)
    with torch.no_grad():
        iv.mask.copy_(torch.tensor([-0.02, 0.0, 0.01, 0.05]))
    m = torch.sigmoid(iv.mask.detach() / 0.01)  # default temperature 0.01
    assert torch.allclose(iv(b, s), (1 - m) * b + m * s, atol=ATOL)
    iv.set_temperature(1.0)
    m = torch.sigmoid(iv.mask.detach())
    assert torch.allclose(iv(b, s), (1 - m) * b + m * s, atol=ATOL)


# -- functions --------------------------------------------------------------------------------------------------------


def test_lambda_two_args():
    b, s = bs()
    iv = pv.LambdaIntervention(lambda base, source: base * 2 + source)
    assert torch.allclose(iv(b, s), b * 2 + s, atol=ATOL)


def test_lambda_three_args_gets_subspaces():
    b, s = bs()
    seen = []

    def fn(base, source, subspaces):
        seen.append(subspaces)
        return base * subspaces["mag"]

    iv = pv.LambdaIntervention(fn)
    assert torch.allclose(iv(b, s, {"mag": 3.0}), b * 3, atol=ATOL)
    assert seen == [{"mag": 3.0}]


# -- the shared contract ----------------------------------------------------------------------------------------------


def _all_interventions():
    def rot(cls, **kw):
        return cls(embed_dim=6, **kw)

    return [
        ("vanilla", pv.VanillaIntervention(embed_dim=6), [[1, 2]]),
        ("skip", pv.SkipIntervention(embed_dim=6), [[1]]),
        ("add", pv.AdditionIntervention(embed_dim=6), [[1, 2]]),
        ("sub", pv.SubtractionIntervention(embed_dim=6), [[0]]),
        ("zero", pv.ZeroIntervention(embed_dim=6), [[3]]),
        ("collect", pv.CollectIntervention(embed_dim=6), [[3]]),
        ("noise", pv.NoiseIntervention(embed_dim=6), [[3]]),
        ("rot", rot(pv.RotatedSpaceIntervention), [[0, 1]]),
        ("lowrank", rot(pv.LowRankRotatedSpaceIntervention, low_rank_dimension=2), [[1]]),
        ("boundless", rot(pv.BoundlessRotatedSpaceIntervention), None),
        ("sigrot", rot(pv.SigmoidMaskRotatedSpaceIntervention), None),
        ("sigmask", rot(pv.SigmoidMaskIntervention), None),
    ]


@pytest.mark.parametrize("idx", range(12))
def test_no_intervention_edits_its_inputs(idx):
    name, iv, sub = _all_interventions()[idx]
    b, s = bs((2, 6))
    b0, s0 = b.clone(), s.clone()
    iv(b, s, sub)
    iv(b, s)
    assert torch.equal(b, b0) and torch.equal(s, s0), name


def test_bad_subspace_index():
    b, s = bs()
    with pytest.raises(ValueError, match="subspace index 6 out of range"):
        pv.VanillaIntervention(embed_dim=6)(b, s, subspaces=[[6]])
    with pytest.raises(ValueError, match="out of range"):
        pv.ZeroIntervention(embed_dim=6)(b, subspaces=[[0, 99]])
    with pytest.raises(ValueError, match="out of range"):
        pv.CollectIntervention(embed_dim=6)(b, subspaces=[[7]])


def test_bad_partition_id():
    b, s = bs()
    iv = pv.VanillaIntervention(embed_dim=6, subspace_partition=[[0, 3], [3, 6]])
    with pytest.raises(ValueError, match="partition id 2 out of range"):
        iv(b, s, subspaces=[[2]])


def test_source_width_mismatch():
    b, _ = bs()
    for iv in (pv.VanillaIntervention(embed_dim=6), pv.AdditionIntervention(embed_dim=6)):
        with pytest.raises(ValueError, match="source width 5"):
            iv(b, torch.zeros(2, 3, 5))


def test_source_shape_that_cannot_broadcast():
    b, _ = bs((1, 7, 6))
    with pytest.raises(ValueError, match="cannot be broadcast"):
        pv.VanillaIntervention(embed_dim=6)(b, torch.zeros(1, 8, 6))


@pytest.mark.parametrize("cls", [pv.VanillaIntervention, pv.AdditionIntervention, pv.SubtractionIntervention,
                                 pv.SkipIntervention, pv.RotatedSpaceIntervention])
def test_missing_source_names_the_class(cls):
    b, _ = bs((2, 6))
    with pytest.raises(ValueError, match=f"{cls.__name__} needs a source"):
        cls(embed_dim=6)(b, None)


def test_trainable_flags():
    assert pv.RotatedSpaceIntervention(embed_dim=4).trainable
    assert pv.LowRankRotatedSpaceIntervention(embed_dim=4, low_rank_dimension=1).trainable
    assert not pv.VanillaIntervention(embed_dim=4).trainable
    assert pv.ZeroIntervention().is_source_constant and pv.CollectIntervention().is_source_constant


# type -> (is_repr_distributed, flattens_units). is_repr_distributed is pyvene's marker (Localist... /
# DistributedRepresentationIntervention mixins): False for types acting on each unit's vector on its own, True for
# rotations whose basis spans the units. Whether the units are flattened before the call is a separate rule:
# Boundless DAS is distributed yet gets (b, n, d) as is, as in pyvene.
REPRESENTATION = {
    pv.VanillaIntervention: (False, False),
    pv.AdditionIntervention: (False, False),
    pv.SubtractionIntervention: (False, False),
    pv.SkipIntervention: (False, False),
    pv.ZeroIntervention: (False, False),
    pv.NoiseIntervention: (False, False),
    pv.SigmoidMaskIntervention: (False, False),
    pv.RotatedSpaceIntervention: (True, True),
    pv.LowRankRotatedSpaceIntervention: (True, True),
    pv.SigmoidMaskRotatedSpaceIntervention: (True, True),
    pv.BoundlessRotatedSpaceIntervention: (True, False),
}


@pytest.mark.parametrize("cls", list(REPRESENTATION), ids=lambda c: c.__name__)
def test_is_repr_distributed(cls):
    distributed, flattened = REPRESENTATION[cls]
    iv = cls(embed_dim=4, low_rank_dimension=2)
    assert iv.is_repr_distributed is cls.is_repr_distributed is distributed
    marker = pv.DistributedRepresentationIntervention if distributed else pv.LocalistRepresentationIntervention
    assert isinstance(iv, marker)
    assert iv.flattens_units is flattened
    # keep_last_dim=True turns flattening off without changing what the representation is
    kept = cls(embed_dim=4, low_rank_dimension=2, keep_last_dim=True)
    assert kept.is_repr_distributed is distributed and kept.flattens_units is False
