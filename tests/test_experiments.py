"""The experiments toolkit (hookvene.experiments) against independent references, on tiny random GPT-2s.

- activation_patch: every kind equals the same sweep done cell by cell with `pv.IntervenableModel` (1e-5).
- causal_trace: equals a manual computation with hand-written hooks (same noise, restore per cell) (1e-5).
- attribution_patch: exact where the metric is affine in the patched activation (a linearised model), and well
  correlated with exact patching on an ordinary random model.
- path_patch: receivers="logits" equals the seed's `path_patching_config` run through IntervenableModel; receiver
  heads equal a manual two-pass computation with run_with_cache / run_with_hooks.
- SweepResult: save/load, normalized, top, plot; bad inputs raise ValueError.
"""

import statistics
import types

import pytest
import torch

import hookvene
import hookvene as pv
from hookvene.experiments.causal_tracing import causal_trace
from hookvene.experiments.metrics import kl_div, logit_diff, prob
from hookvene.experiments.patching import KINDS, activation_patch, attribution_patch, compare
from hookvene.experiments.path_patching import path_patch
from hookvene.experiments.results import SweepResult
from tests.helpers import tiny_gpt2

ATOL = 1e-5
N_VOCAB, SEQ, BATCH = 101, 5, 3
# initializer_range 0.2 (HF default 0.02): sharper attention and larger effects (order 0.1-1), far above the 1e-5
# tolerance
INIT = 0.2


def make_model(n_layer=2, seed=0, init=INIT):
    return hookvene.from_pretrained(tiny_gpt2(seed=seed, n_layer=n_layer, initializer_range=init))


def ids(seed, batch=BATCH, seq=SEQ):
    return torch.randint(1, N_VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


CLEAN = ids(1)
CORRUPTED = CLEAN.clone()
CORRUPTED[:, 1] = ids(2, seq=1)[:, 0]  # one token changed, as in IOI-style pairs
CORRUPTED[:, 3] = ids(3, seq=1)[:, 0]
ANSWER, WRONG = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])
METRIC = logit_diff(ANSWER, WRONG)


def mean_metric(metric, logits):
    return float(metric(logits, torch.arange(logits.shape[0])).mean().detach())


@pytest.fixture(scope="module")
def model():
    return make_model()


# -- activation_patch == a cell-by-cell IntervenableModel loop -------------------------------------------------------

# kind -> (pyvene component for layer l, unit, per-cell unit_locations builder or None = the whole tensor)
COMPONENTS = {
    "resid_pre": ("block_input", "pos"),
    "resid_mid": ("blocks.{l}.hook_resid_mid", "pos"),  # a raw hook name as the component
    "resid_post": ("block_output", "pos"),
    "attn_out": ("attention_output", "pos"),
    "mlp_out": ("mlp_output", "pos"),
    "attn_layer": ("attention_output", "pos"),
    "mlp_layer": ("mlp_output", "pos"),
    "heads": ("head_attention_value_output", "h"),
    "heads_pos": ("head_attention_value_output", "h.pos"),
    "pattern": ("attention_weight", "h"),
}


def cell_by_cell(model, kind, clean, corrupted, metric):
    """The sweep as one IntervenableModel call per cell: base = corrupted, sources = [clean], VanillaIntervention
    at the matching component; returns the grid in activation_patch's row/column order."""
    ids_ = corrupted["input_ids"] if isinstance(corrupted, dict) else corrupted
    cfg, b, n_pos = model.cfg, ids_.shape[0], ids_.shape[1]
    comp, unit = COMPONENTS[kind]
    rows = []
    for layer in range(cfg.n_layers):
        pv_model = pv.IntervenableModel(
            [{"layer": layer, "component": comp.format(l=layer), "unit": unit,
              "intervention_type": pv.VanillaIntervention}], model=model)

        def run(loc, pv_model=pv_model):
            _, out = pv_model(base=corrupted, sources=[clean], unit_locations=loc)
            return mean_metric(metric, out.logits)

        if kind in ("attn_layer", "mlp_layer"):
            rows.append([run(None)])  # no unit_locations: the whole tensor
        elif unit == "pos":
            rows.append([run({"sources->base": p}) for p in range(n_pos)])
        elif unit == "h":
            rows.append([run({"sources->base": h}) for h in range(cfg.n_heads)])
        else:  # h.pos: one grid row per (layer, head)
            for h in range(cfg.n_heads):
                rows.append([run({"sources->base": pv.GET_LOC((h, p), batch_size=b)}) for p in range(n_pos)])
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def reference_grids(model):
    return {kind: cell_by_cell(model, kind, CLEAN, CORRUPTED, METRIC) for kind in KINDS}


def test_kinds_are_all_covered():
    assert set(COMPONENTS) == set(KINDS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_activation_patch_equals_cell_by_cell(model, reference_grids, kind):
    ref = reference_grids[kind]
    # BATCH = 3 examples: batch_size 1 -> 1 cell per chunk (fewer rows than examples still works), 10 -> 3 cells
    # per chunk (a ragged last chunk for 10, 8, 40 and 2 cells), 64 -> 21 cells per chunk
    for batch_size in (1, 10, 64):
        res = activation_patch(model, CLEAN, CORRUPTED, METRIC, kind=kind, batch_size=batch_size)
        assert res.values.shape == ref.shape, (kind, res.values.shape, ref.shape)
        err = (res.values - ref).abs().max().item()
        assert err <= ATOL, (kind, batch_size, err)
    assert res.clean == pytest.approx(mean_metric(METRIC, model(CLEAN).logits), abs=ATOL)
    assert res.corrupted == pytest.approx(mean_metric(METRIC, model(CORRUPTED).logits), abs=ATOL)
    assert (ref - res.corrupted).abs().max() > 1e-3, "the sweep is trivial: no cell changes the metric"
    assert len(res.rows) == ref.shape[0] and len(res.cols) == ref.shape[1]


@pytest.mark.parametrize("kind", ["resid_pre", "heads_pos", "pattern"])
def test_shared_prefix_padding_and_plain_metrics(model, kind):
    """Pairs that agree on their first 3 tokens, right padding, and a metric read at each example's last real
    token: the sweep (which then recomputes only positions 3.. from a KV cache) equals the cell-by-cell loop;
    so does a plain-function metric (no position known: nothing is skipped)."""
    clean = ids(11, seq=7)
    corrupted = clean.clone()
    corrupted[:, 3:5] = ids(12, seq=2)
    mask = torch.ones_like(clean)
    mask[1, 6:] = 0
    mask[2, 5:] = 0
    last = mask.sum(1) - 1
    metrics = [logit_diff(ANSWER, WRONG, pos=last)]
    metrics.append(lambda logits, ex: logits[torch.arange(len(ex)), last[ex], 3] - logits[:, 0, 4])  # reads pos 0
    for metric in metrics:
        c, x = {"input_ids": clean, "attention_mask": mask}, {"input_ids": corrupted, "attention_mask": mask}
        ref = cell_by_cell(model, kind, c, x, metric)
        res = activation_patch(model, c, x, metric, kind=kind, batch_size=16)
        assert (res.values - ref).abs().max().item() <= ATOL, kind
        assert (ref - res.corrupted).abs().max() > 1e-3
    if kind != "pattern":  # patching the shared prefix changes nothing
        assert torch.allclose(res.values[:, :3], torch.full_like(res.values[:, :3], res.corrupted), atol=ATOL)


def test_activation_patch_accepts_tokenizer_style_dicts(model):
    a = activation_patch(model, {"input_ids": CLEAN}, {"input_ids": CORRUPTED}, METRIC, kind="resid_pre")
    b = activation_patch(model, CLEAN, CORRUPTED, METRIC, kind="resid_pre")
    assert torch.allclose(a.values, b.values, atol=ATOL)


def test_full_residual_patch_restores_clean(model):
    """Patching every position of the last residual stream (= the whole tensor) gives the clean run back."""
    pv_model = pv.IntervenableModel([{"layer": model.cfg.n_layers - 1, "component": "block_output"}], model=model)
    _, out = pv_model(base=CORRUPTED, sources=[CLEAN])
    res = activation_patch(model, CLEAN, CORRUPTED, METRIC, kind="resid_pre")
    assert mean_metric(METRIC, out.logits) == pytest.approx(res.clean, abs=ATOL)


# -- causal_trace == a manual computation with hand-written hooks ---------------------------------------------------

CT_LAYERS, CT_PROMPT, CT_SUBJECT, CT_TARGET, CT_SAMPLES = 4, ids(7, batch=1, seq=6), [1, 2], 11, 10
STATE = {"resid_post": "blocks.{}.hook_resid_post", "mlp_out": "blocks.{}.hook_mlp_out",
         "attn_out": "blocks.{}.hook_attn_out"}


@pytest.fixture(scope="module")
def ct_model():
    return make_model(n_layer=CT_LAYERS, seed=3)


def manual_trace(model, prompt, subject, target, kind, window, n_samples, seed, scale):
    """ROME's recipe, written out: the same Gaussian noise (n_samples x subject x d_model from a generator seeded with
    `seed`, times `scale`) added at hook_embed on the subject positions; for each (layer, pos) the clean value of the
    state restored at `pos` in `window` layers centred on `layer` (clipped); P(target) at the last position
    averaged over the noise samples. Returns (grid, corrupted baseline)."""
    n_layers, n_pos = model.cfg.n_layers, prompt.shape[1]
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_samples, len(subject), model.cfg.d_model, generator=gen) * scale
    batch = prompt.repeat(n_samples, 1)
    _, clean_cache = model.run_with_cache(prompt)

    def add_noise(x, hook):
        x = x.clone()
        x[:, subject] = x[:, subject] + noise
        return x

    def restore_at(pos):
        def fn(x, hook):
            x = x.clone()
            x[:, pos] = clean_cache[hook.name][0, pos]
            return x
        return fn

    def p_target(hooks):
        logits = model.run_with_hooks(batch, fwd_hooks=[("hook_embed", add_noise)] + hooks).logits
        return float(logits[:, -1].softmax(-1)[:, target].mean().detach())

    grid = torch.empty(n_layers, n_pos)
    for layer in range(n_layers):
        # `window` layers centred on `layer` (one more before than after when even, as in ROME), clipped
        lo, hi = max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2)
        for pos in range(n_pos):
            grid[layer, pos] = p_target([(STATE[kind].format(j), restore_at(pos)) for j in range(lo, hi)])
    return grid, p_target([])


@pytest.mark.parametrize("kind,window", [("resid_post", 1), ("resid_post", 3), ("mlp_out", 3), ("attn_out", 2)])
def test_causal_trace_equals_manual(ct_model, kind, window):
    scale = 3 * float(ct_model.embed.weight.detach().std())  # the documented default: 3 sigma of the token embeddings
    res = causal_trace(ct_model, CT_PROMPT, CT_SUBJECT, CT_TARGET, kind=kind, window=window, n_samples=CT_SAMPLES,
                       seed=5, batch_size=32)
    ref, corrupted = manual_trace(ct_model, CT_PROMPT, CT_SUBJECT, CT_TARGET, kind, window, CT_SAMPLES, 5, scale)
    assert res.extra["noise_scale"] == pytest.approx(scale, rel=1e-6)
    assert res.values.shape == (CT_LAYERS, CT_PROMPT.shape[1])
    assert (res.values - ref).abs().max().item() <= ATOL
    assert res.corrupted == pytest.approx(corrupted, abs=ATOL)
    clean = float(ct_model(CT_PROMPT).logits[0, -1].softmax(-1)[CT_TARGET].detach())
    assert res.clean == pytest.approx(clean, abs=ATOL)
    assert abs(res.clean - res.corrupted) > 1e-3, "the noise changes nothing: the test would be vacuous"


def test_causal_trace_sanity(ct_model):
    res = causal_trace(ct_model, CT_PROMPT, CT_SUBJECT, CT_TARGET, kind="resid_post", n_samples=4, batch_size=7)
    # the last layer's residual stream at the last position is all the logits read: restoring it restores P(target)
    assert res.values[-1, -1].item() == pytest.approx(res.clean, abs=ATOL)
    # positions before the first subject token never see the noise (causal attention)
    assert torch.allclose(res.values[:, : CT_SUBJECT[0]], torch.full_like(res.values[:, : CT_SUBJECT[0]],
                                                                           res.corrupted), atol=ATOL)
    # different chunkings and the same seed: the same grid; another seed: other noise
    again = causal_trace(ct_model, CT_PROMPT, CT_SUBJECT, CT_TARGET, kind="resid_post", n_samples=4, batch_size=100)
    assert (res.values - again.values).abs().max().item() <= ATOL
    other = causal_trace(ct_model, CT_PROMPT, CT_SUBJECT, CT_TARGET, kind="resid_post", n_samples=4, seed=1)
    assert (res.values - other.values).abs().max().item() > 1e-4


# -- attribution_patch ------------------------------------------------------------------------------------------------

LN_GAIN = 2.0  # with init 0.2: logits of order 10, effects of order 1 (float64, so 1e-5 is a tight bound)


def linearize(model, freeze_attention):
    """Make the map from every hooked activation to the logits affine, keeping every hook point:

    - each LayerNorm becomes x -> (x - mean(x)) * LN_GAIN * weight + bias (centering is linear; the division by the
      data-dependent std, the only nonlinearity of a LayerNorm, is replaced by a constant gain), still ending in its
      `hook_normalized`;
    - the MLP activation becomes the identity (the MLP is then affine);
    - with `freeze_attention`, W_Q, W_K and their biases are zeroed: every score is 0, the pattern is the constant
      causal average 1/(q+1), so z = pattern @ v is affine in the block input.

    With a logit difference as the metric (linear in the logits), the metric is then an affine function of every
    activation, and the first-order estimate is exact for every cell. Without `freeze_attention`, softmax(q.k) stays
    nonlinear, but downstream of the *last* layer's pattern / z / attn_out / resid_mid / mlp_out / resid_post
    everything is still affine (z = pattern @ v, v does not depend on that layer's pattern), so exactly those
    last-layer cells are exact."""
    def affine_ln(self, x):
        return self.hook_normalized((x - x.mean(-1, keepdim=True)) * LN_GAIN * self.weight + self.bias)

    for ln in [m for b in model.blocks for m in (b.ln1, b.ln2)] + [model.ln_final]:
        ln.forward = types.MethodType(affine_ln, ln)
    for b in model.blocks:
        b.mlp.act = lambda x: x
        if freeze_attention:
            d = model.cfg.d_model
            with torch.no_grad():
                b.attn.qkv.weight[:, : 2 * d] = 0
                b.attn.qkv.bias[: 2 * d] = 0
    return model


@pytest.fixture(scope="module")
def affine_model():
    return linearize(make_model(seed=1), freeze_attention=True).double()


@pytest.fixture(scope="module")
def last_layer_affine_model():
    return linearize(make_model(seed=2), freeze_attention=False).double()


def test_linearized_model_is_affine(affine_model):
    """Check of the construction itself: logits(a + b - c) == logits(a) + logits(b) - logits(c) in embedding space."""
    e = [affine_model.embed(ids(s)) for s in (11, 12, 13)]
    lg = [affine_model(inputs_embeds=x).logits for x in (*e, e[0] + e[1] - e[2])]
    assert lg[0].std() > 1
    assert (lg[3] - (lg[0] + lg[1] - lg[2])).abs().max().item() < 1e-9


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "pattern"])
def test_attribution_exact_on_affine_model(affine_model, kind):
    exact = activation_patch(affine_model, CLEAN, CORRUPTED, METRIC, kind=kind)
    approx = attribution_patch(affine_model, CLEAN, CORRUPTED, METRIC, kind=kind)
    assert approx.values.shape == exact.values.shape
    assert approx.rows == exact.rows and approx.cols == exact.cols
    assert (exact.values - exact.corrupted).abs().max() > 1e-2, "trivial: no cell moves the metric"
    err = (approx.values - exact.values).abs().max().item()
    assert err <= ATOL, (kind, err)
    assert approx.corrupted == pytest.approx(exact.corrupted, abs=ATOL)
    assert approx.clean == pytest.approx(exact.clean, abs=ATOL)


@pytest.mark.parametrize("kind", ["pattern", "heads", "heads_pos", "attn_out", "resid_mid", "mlp_out", "resid_post"])
def test_attribution_exact_downstream_of_last_attention(last_layer_affine_model, kind):
    model = last_layer_affine_model
    exact = activation_patch(model, CLEAN, CORRUPTED, METRIC, kind=kind)
    approx = attribution_patch(model, CLEAN, CORRUPTED, METRIC, kind=kind)
    last = [i for i, r in enumerate(exact.rows) if r.startswith(str(model.cfg.n_layers - 1))
            or r.startswith(f"L{model.cfg.n_layers - 1}H")]
    assert (exact.values[last] - exact.corrupted).abs().max() > 1e-2, "trivial: no last-layer cell moves the metric"
    err = (approx.values[last] - exact.values[last]).abs().max().item()
    assert err <= ATOL, (kind, err)
    if kind in ("pattern", "heads"):  # control: through layer 1's softmax the estimate is only approximate
        first = [i for i in range(len(exact.rows)) if i not in last]
        assert (approx.values[first] - exact.values[first]).abs().max().item() > 1e-3


# Correlation of attribution with exact patching on random models with an ordinary (HF default, 0.02) init and the
# CLEAN/CORRUPTED pair. heads: 1.000 for every seed 0-9, 2 to 4 layers. resid_pre is method-limited: its layer-0 cells
# at the swapped tokens patch a whole token embedding through LayerNorm, far outside the linear regime (float64 gives
# the same numbers, so this is the method, not round-off). With 2 layers those cells dominate and one model is a coin
# toss (seeds 0-4: 0.96, -0.18, 0.67, 0.84, 0.35); with 4 layers the downstream cells, where the approximation holds,
# dominate (seeds 0-9: 0.80, 0.97, 0.98, 0.93, 0.95, 0.91, 0.99, 0.95, 0.86, 0.98; the median of any 3 consecutive
# seeds is >= 0.93). Hence 4 layers and the median over 3 seeds.
MIN_CORRELATION = {"heads": 0.99, "resid_pre": 0.8}
CORRELATION_SEEDS = (0, 1, 2)


@pytest.mark.parametrize("kind", ["heads", "resid_pre"])
def test_attribution_correlates_with_exact(kind):
    correlations = []
    for seed in CORRELATION_SEEDS:
        model = make_model(n_layer=4, seed=seed, init=0.02)  # LayerNorms, GELU, softmax intact
        exact = activation_patch(model, CLEAN, CORRUPTED, METRIC, kind=kind)
        approx = attribution_patch(model, CLEAN, CORRUPTED, METRIC, kind=kind)
        assert approx.kind == f"attribution:{kind}"
        correlations.append(compare(exact, approx)["correlation"])
    assert statistics.median(correlations) > MIN_CORRELATION[kind], correlations


def test_attribution_leaves_model_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attribution_patch(model, CLEAN, CORRUPTED, METRIC, kind="heads")
    assert not model.has_hooks()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# -- path_patch --------------------------------------------------------------------------------------------------------

PP_LAYERS = 3


@pytest.fixture(scope="module")
def pp_model():
    return make_model(n_layer=PP_LAYERS, seed=4)


def path_patching_config(layer, last_layer, component="head_attention_value_output", unit="h.pos"):
    """The seed notebook's cell, verbatim ("Composing Complex Intervention Schema: Path Patching")."""
    intervening_component = [
        {"layer": layer, "component": component, "unit": unit, "group_key": 0}]
    restoring_components = []
    if not component.startswith("mlp_"):
        restoring_components += [
            {"layer": layer, "component": "mlp_output", "group_key": 1}]
    for i in range(layer + 1, last_layer):
        restoring_components += [
            {"layer": i, "component": "attention_output", "group_key": 1},
            {"layer": i, "component": "mlp_output", "group_key": 1}
        ]
    intervenable_config = pv.IntervenableConfig(
        intervening_component + restoring_components)
    return intervenable_config


def test_path_patch_logits_equals_seed_config(pp_model):
    """Base = clean; group 0 = the sender head (every position) from the corrupted run; group 1 = the sender layer's
    MLP and every later attention / MLP output, whole tensors (None locations), from the clean run."""
    cfg, b = pp_model.cfg, CLEAN.shape[0]
    ref = torch.empty(cfg.n_layers, cfg.n_heads)
    for layer in range(cfg.n_layers):
        pv_model = pv.IntervenableModel(path_patching_config(layer, cfg.n_layers, unit="h"), model=pp_model)
        n = len(pv_model.slots)
        for h in range(cfg.n_heads):
            _, out = pv_model(base=CLEAN, sources=[CORRUPTED, CLEAN],
                              unit_locations={"sources->base": [[[h]] * b] + [None] * (n - 1)})
            ref[layer, h] = mean_metric(METRIC, out.logits)
    for batch_size in (1, 64):
        res = path_patch(pp_model, CLEAN, CORRUPTED, METRIC, batch_size=batch_size)
        assert (res.values - ref).abs().max().item() <= ATOL, batch_size
    assert (ref - res.clean).abs().max() > 1e-3, "trivial: no sender moves the metric"
    # a subset of senders fills only its cells
    sub = path_patch(pp_model, CLEAN, CORRUPTED, METRIC, senders=[(0, 1), (2, 3)])
    assert sub.values[0, 1].item() == pytest.approx(ref[0, 1].item(), abs=ATOL)
    assert sub.values[2, 3].item() == pytest.approx(ref[2, 3].item(), abs=ATOL)
    assert int(torch.isnan(sub.values).sum()) == cfg.n_layers * cfg.n_heads - 2


def manual_path_patch(model, clean, corrupted, metric, sender, receivers):
    """Two passes, written out. Pass 1: the clean run with the sender head's z taken from the corrupted run and every
    other head's z frozen to its clean value (MLPs recompute); record each receiver's activation. Pass 2: the clean
    run with only the receivers' heads replaced by the recorded values."""
    n_layers = model.cfg.n_layers
    zs = [f"blocks.{j}.attn.hook_z" for j in range(n_layers)]
    _, clean_cache = model.run_with_cache(clean, names_filter=zs)
    _, corr_cache = model.run_with_cache(corrupted, names_filter=zs)
    s_layer, s_head = sender

    def freeze(x, hook):
        new = clean_cache[hook.name].clone()
        if hook.name == zs[s_layer]:
            new[:, :, s_head] = corr_cache[hook.name][:, :, s_head]
        return new

    with model.hooks(fwd_hooks=[(z, freeze) for z in zs]):
        _, recorded = model.run_with_cache(clean, names_filter=sorted({r for r, _ in receivers}))

    def put(name, head):
        def fn(x, hook):
            x = x.clone()
            x[:, :, head] = recorded[name][:, :, head]
            return x
        return fn

    logits = model.run_with_hooks(clean, fwd_hooks=[(r, put(r, h)) for r, h in receivers]).logits
    return mean_metric(metric, logits)


@pytest.mark.parametrize("receivers", [
    [("blocks.2.attn.hook_q", 1)],
    [("blocks.2.attn.hook_q", 1), ("blocks.1.attn.hook_v", 0), ("blocks.2.attn.hook_k", 3)],
])
def test_path_patch_receivers_equals_manual_two_pass(pp_model, receivers):
    cfg = pp_model.cfg
    ref = torch.tensor([[manual_path_patch(pp_model, CLEAN, CORRUPTED, METRIC, (lay, h), receivers)
                         for h in range(cfg.n_heads)] for lay in range(cfg.n_layers)])
    for batch_size in (5, 64):  # 5 rows = 1 sender per chunk with 3 examples
        res = path_patch(pp_model, CLEAN, CORRUPTED, METRIC, receivers=receivers, batch_size=batch_size)
        assert (res.values - ref).abs().max().item() <= ATOL, batch_size
    # senders at or after every receiver's layer cannot reach it: the clean metric, exactly
    last = max(int(r.split(".")[1]) for r, _ in receivers)
    assert (res.values[last:] - res.clean).abs().max().item() <= ATOL
    assert (res.values[:last] - res.clean).abs().max().item() > 1e-3, "trivial: no sender moves the metric"


# -- SweepResult ------------------------------------------------------------------------------------------------------

def small_result():
    return SweepResult(torch.tensor([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]]), "resid_pre", "logit_diff", "layer",
                       "position", ["0", "1"], ["0", "1", "2"], clean=3.0, corrupted=1.0,
                       extra={"subject": [1, 2], "note": "x"})


def test_sweep_result_normalized_and_top():
    r = small_result()
    assert torch.allclose(r.normalized, (r.values - 1.0) / 2.0)
    assert torch.allclose(r.normalized_effect, r.normalized)  # activation patching: the same number
    # effects (value - corrupted 1.0): -1, 0, 1, 2, -2, -0.5: by size, sign shown in the value
    assert set(r.top(2)) == {("1", "0", 3.0), ("1", "1", -1.0)}  # |effect| 2 both
    assert r.top(1, by="toward") == [("1", "0", 3.0)]
    assert r.top(1, by="away") == [("1", "1", -1.0)]
    assert len(r.top(100)) == 6
    assert "resid_pre" in r.table(2)


def test_sweep_result_save_load_round_trip(tmp_path, model):
    for r in (small_result(), activation_patch(model, CLEAN, CORRUPTED, METRIC, kind="heads")):
        path = str(tmp_path / "r.pt")
        r.save(path)
        back = SweepResult.load(path)
        assert torch.equal(back.values, r.values)
        for f in ("kind", "metric", "row_label", "col_label", "rows", "cols", "clean", "corrupted", "extra"):
            assert getattr(back, f) == getattr(r, f), f


def test_sweep_result_plot_writes_png(tmp_path):
    path = tmp_path / "grid.png"
    small_result().plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- bad input --------------------------------------------------------------------------------------------------------

SHAPES = "must have the same shape to be patched position by position"
SUBJECT = "must be non-empty and within the prompt's 6 tokens"
RECEIVERS = r"receivers must be per-head hooks \(attn\.hook_q/k/v/z\) of this model"
# case -> (a regex of the message it must raise, the call)
BAD_INPUTS = {
    "unknown kind (activation_patch)": (
        "unknown sweep kind 'neurons'; choose one of resid_pre",
        lambda m, ct: activation_patch(m, CLEAN, CORRUPTED, METRIC, kind="neurons")),
    "unknown kind (attribution_patch)": (
        "unknown sweep kind 'neurons'; choose one of resid_pre",
        lambda m, ct: attribution_patch(m, CLEAN, CORRUPTED, METRIC, kind="neurons")),
    "unknown kind (causal_trace)": (
        r"kind must be one of \['resid_post', 'mlp_out', 'attn_out'\], got 'neurons'",
        lambda m, ct: causal_trace(ct, CT_PROMPT, CT_SUBJECT, CT_TARGET, kind="neurons")),
    "shorter corrupted (activation_patch)": (
        r"clean \(3, 5\) and corrupted \(3, 4\) inputs " + SHAPES,
        lambda m, ct: activation_patch(m, CLEAN, CORRUPTED[:, :-1], METRIC)),
    "fewer corrupted (activation_patch)": (
        r"clean \(3, 5\) and corrupted \(2, 5\) inputs " + SHAPES,
        lambda m, ct: activation_patch(m, CLEAN, CORRUPTED[:2], METRIC)),
    "shorter corrupted (attribution_patch)": (
        r"clean \(3, 5\) and corrupted \(3, 4\) inputs " + SHAPES,
        lambda m, ct: attribution_patch(m, CLEAN, CORRUPTED[:, :-1], METRIC)),
    "fewer corrupted (path_patch)": (
        r"clean \(3, 5\) and corrupted \(2, 5\) inputs " + SHAPES,
        lambda m, ct: path_patch(m, CLEAN, CORRUPTED[:2], METRIC)),
    "batch of prompts (causal_trace)": (
        "causal_trace takes one prompt, got a batch of 3",
        lambda m, ct: causal_trace(ct, CLEAN, [1], CT_TARGET)),
    "subject past the end": (
        r"subject positions \[6\] " + SUBJECT,
        lambda m, ct: causal_trace(ct, CT_PROMPT, [CT_PROMPT.shape[1]], CT_TARGET)),
    "negative subject": (
        r"subject positions \[-1\] " + SUBJECT,
        lambda m, ct: causal_trace(ct, CT_PROMPT, [-1], CT_TARGET)),
    "one subject out of range": (
        r"subject positions \[0, 99\] " + SUBJECT,
        lambda m, ct: causal_trace(ct, CT_PROMPT, [0, 99], CT_TARGET)),
    "empty subject": (
        r"subject positions \[\] " + SUBJECT,
        lambda m, ct: causal_trace(ct, CT_PROMPT, [], CT_TARGET)),
    "unknown receiver hook": (
        RECEIVERS + r".*got \['blocks\.9\.attn\.hook_q'\]",
        lambda m, ct: path_patch(m, CLEAN, CORRUPTED, METRIC, receivers=[("blocks.9.attn.hook_q", 0)])),
    # the five below used to fail deep inside the sweep (IndexError / KeyError / RuntimeError), not up front
    "receiver hook without heads": (
        RECEIVERS + r".*got \['blocks\.1\.hook_resid_pre'\]",
        lambda m, ct: path_patch(m, CLEAN, CORRUPTED, METRIC, receivers=[("blocks.1.hook_resid_pre", 0)])),
    "receiver head out of range": (
        r"receiver heads \[\('blocks\.1\.attn\.hook_q', 7\)\] out of range: the model has 4 heads",
        lambda m, ct: path_patch(m, CLEAN, CORRUPTED, METRIC, receivers=[("blocks.1.attn.hook_q", 7)])),
    "sender layer out of range": (
        r"sender heads \[\(5, 0\)\] out of range: the model has 2 layers x 4 heads",
        lambda m, ct: path_patch(m, CLEAN, CORRUPTED, METRIC, senders=[(5, 0)])),
    "sender head out of range": (
        r"sender heads \[\(0, 9\)\] out of range: the model has 2 layers x 4 heads",
        lambda m, ct: path_patch(m, CLEAN, CORRUPTED, METRIC, senders=[(0, 9)])),
    "target outside the vocabulary": (
        r"target token 106 is outside the vocabulary \[0, 101\)",
        lambda m, ct: causal_trace(ct, CT_PROMPT, CT_SUBJECT, N_VOCAB + 5)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(model, ct_model, case):
    message, call = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call(model, ct_model)


def test_top_ignores_cells_left_empty(pp_model):
    """path_patch with a subset of senders leaves the other cells NaN; top() must rank only the computed cells
    (torch.topk ranks NaN above everything, in both directions)."""
    sub = path_patch(pp_model, CLEAN, CORRUPTED, METRIC, senders=[(0, 1), (2, 3)])
    assert {(r, c) for r, c, _ in sub.top(5)} == {("0", "1"), ("2", "3")}
    assert {(r, c) for r, c, _ in sub.top(5, by="away")} == {("0", "1"), ("2", "3")}


def test_metrics_read_the_named_position(model):
    logits = model(CLEAN).logits
    ex = torch.arange(BATCH)
    at2 = prob(torch.tensor([1, 2, 3]), pos=2)(logits, ex)
    assert torch.allclose(at2, logits[ex, 2].softmax(-1)[ex, torch.tensor([1, 2, 3])])
    ld = logit_diff(4, 9, pos=torch.tensor([0, 4, 2]))(logits, ex)
    assert torch.allclose(ld, logits[ex, torch.tensor([0, 4, 2]), 4] - logits[ex, torch.tensor([0, 4, 2]), 9])
    assert kl_div(logits)(logits, ex).abs().max() < 1e-6
    assert (kl_div(logits)(model(CORRUPTED).logits, ex) > 0).all()


# -- GPT-Neo: the sweeps' resume paths (KV-cached prefix, local windows, last block at one position) ------------------


@pytest.fixture(scope="module")
def neo_model():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(4)
    cfg = GPTNeoConfig(vocab_size=N_VOCAB, max_position_embeddings=32, hidden_size=24, num_layers=3, num_heads=4,
                       intermediate_size=40, attention_types=[[["global", "local"], 1], [["local"], 1]],
                       window_size=3, resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0)
    hf = GPTNeoForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return hookvene.from_pretrained(hf)


@pytest.mark.parametrize("kind", ["resid_pre", "heads", "mlp_out"])
def test_activation_patch_on_gpt_neo(neo_model, kind):
    clean = ids(21, seq=8)
    corrupted = clean.clone()
    corrupted[:, 4] = ids(22, seq=1)[:, 0]  # positions 0-3 shared: resumed from a KV cache, past the window of 3
    ref = cell_by_cell(neo_model, kind, clean, corrupted, METRIC)
    res = activation_patch(neo_model, clean, corrupted, METRIC, kind=kind, batch_size=8)
    assert (res.values - ref).abs().max().item() <= ATOL
    assert (ref - res.corrupted).abs().max() > 1e-3


def test_causal_trace_on_gpt_neo(neo_model):
    prompt, subject = ids(23, batch=1, seq=7), [2, 3]
    scale = 3 * float(neo_model.embed.weight.detach().std())
    for kind, window in (("resid_post", 1), ("mlp_out", 2)):
        res = causal_trace(neo_model, prompt, subject, CT_TARGET, kind=kind, window=window, n_samples=3, seed=2)
        ref, corrupted = manual_trace(neo_model, prompt, subject, CT_TARGET, kind, window, 3, 2, scale)
        assert (res.values - ref).abs().max().item() <= ATOL
        assert res.corrupted == pytest.approx(corrupted, abs=ATOL)
        assert (ref - corrupted).abs().max() > 1e-4


def test_models_the_sweeps_cannot_run_raise_clearly():
    from transformers import GPT2Model, T5Config, T5ForConditionalGeneration

    t5 = hookvene.from_pretrained(T5ForConditionalGeneration(T5Config(vocab_size=N_VOCAB, d_model=16, d_kv=4,
                                                                       d_ff=32, num_layers=1, num_heads=4)))
    base = hookvene.from_pretrained(GPT2Model(tiny_gpt2(n_layer=1).config))  # no LM head: no logits to measure
    runs = {"activation_patch": lambda m: activation_patch(m, CLEAN, CORRUPTED, METRIC),
            "attribution_patch": lambda m: attribution_patch(m, CLEAN, CORRUPTED, METRIC),
            "path_patch": lambda m: path_patch(m, CLEAN, CORRUPTED, METRIC),
            "causal_trace": lambda m: causal_trace(m, CT_PROMPT, CT_SUBJECT, CT_TARGET)}
    for m in (t5, base):
        for name, run in runs.items():
            with pytest.raises(ValueError, match=f"{name} works on .*decoder-only.*got {type(m).__name__}"):
                run(m)


# -- TransformerLens-style metrics (one number per batch) and the q/k/v head kinds ----------------------------------

def tl_logit_diff(logits):
    """TL's patching metric: one number for the batch (the mean logit difference at the last position)."""
    rows = torch.arange(logits.shape[0])
    return (logits[rows, -1, ANSWER] - logits[rows, -1, WRONG]).mean()


def tl_spread(logits, answer=5, wrong=8):
    """Not a mean over rows (max and min over the batch), with TL-style defaulted extra arguments."""
    return logits[:, -1, answer].max() - logits[:, -1, wrong].min()


def patched_metric(model, hook, index, clean, corrupted, metric):
    """One cell by hand: the corrupted run with clean[index] written into `hook`, then metric(logits)."""
    _, cache = model.run_with_cache(clean, names_filter=[hook])

    def write(x, hook):
        x = x.clone()
        x[index] = cache[hook.name][index]
        return x
    with torch.no_grad():
        logits = model.run_with_hooks(corrupted, fwd_hooks=[(hook, write)]).logits
        return float(metric(logits))


@pytest.mark.parametrize("kind", ["resid_pre", "heads", "heads_v_pos", "pattern", "mlp_layer"])
def test_scalar_metric_equals_mean_of_per_row_metric(model, kind):
    per_row = activation_patch(model, CLEAN, CORRUPTED, METRIC, kind=kind, batch_size=10)
    scalar = activation_patch(model, CLEAN, CORRUPTED, tl_logit_diff, kind=kind, batch_size=10)
    plain = activation_patch(model, CLEAN, CORRUPTED, lambda lg, ex: METRIC(lg, ex), kind=kind, batch_size=10)
    assert (scalar.values - per_row.values).abs().max().item() <= ATOL
    assert (plain.values - per_row.values).abs().max().item() <= ATOL
    assert scalar.clean == pytest.approx(per_row.clean, abs=ATOL)
    assert scalar.corrupted == pytest.approx(per_row.corrupted, abs=ATOL)
    assert (per_row.values - per_row.corrupted).abs().max() > 1e-3


def test_scalar_metric_sees_the_whole_batch_of_each_cell(model):
    """A metric that is not a mean over rows: each cell is the metric of that cell's patched batch, as TL's
    get_act_patch_resid_pre gives, checked against a hand-written hook loop."""
    res = activation_patch(model, CLEAN, CORRUPTED, tl_spread, kind="resid_pre", batch_size=7)
    ref = torch.tensor([[patched_metric(model, f"blocks.{layer}.hook_resid_pre", (slice(None), p), CLEAN, CORRUPTED,
                                        tl_spread) for p in range(SEQ)] for layer in range(model.cfg.n_layers)])
    assert (res.values - ref).abs().max().item() <= ATOL
    with torch.no_grad():
        assert res.corrupted == pytest.approx(float(tl_spread(model(CORRUPTED).logits)), abs=ATOL)
        assert res.clean == pytest.approx(float(tl_spread(model(CLEAN).logits)), abs=ATOL)
    assert (ref - res.corrupted).abs().max() > 1e-3


def test_scalar_metric_in_attribution_patch(affine_model):
    per_row = attribution_patch(affine_model, CLEAN, CORRUPTED, METRIC, kind="heads")
    scalar = attribution_patch(affine_model, CLEAN, CORRUPTED, tl_logit_diff, kind="heads")
    assert (scalar.values - per_row.values).abs().max().item() <= ATOL
    assert scalar.corrupted == pytest.approx(per_row.corrupted, abs=ATOL)


@pytest.mark.parametrize("metric", [lambda logits: logits[:, -1, :2], lambda logits: "no", lambda lg, ex: lg[:, -1]])
def test_metric_of_another_shape_is_refused(model, metric):
    with pytest.raises(ValueError, match="one number for the whole batch.*one value per row"):
        activation_patch(model, CLEAN, CORRUPTED, metric, kind="attn_layer")


def qkv_by_hand(model, kind, clean, corrupted, metric):
    """The q/k/v sweep with hand-written hooks, one cell at a time (TL's get_act_patch_attn_head_*_all_pos and
    _by_pos), in activation_patch's row/column order; k and v cells count key/value heads."""
    x = kind.split("_")[1]
    n = model.cfg.n_heads if x == "q" else getattr(model.cfg, "n_kv_heads", None) or model.cfg.n_heads
    n_pos = corrupted.shape[1]
    rows = []
    for layer in range(model.cfg.n_layers):
        hook = f"blocks.{layer}.attn.hook_{x}"
        if kind.endswith("_pos"):
            rows += [[patched_metric(model, hook, (slice(None), p, h), clean, corrupted, metric)
                      for p in range(n_pos)] for h in range(n)]
        else:
            rows.append([patched_metric(model, hook, (slice(None), slice(None), h), clean, corrupted, metric)
                         for h in range(n)])
    return torch.tensor(rows)


def mean_of(metric):
    return lambda logits: metric(logits, torch.arange(logits.shape[0])).mean()


@pytest.mark.parametrize("kind", ["heads_q", "heads_k", "heads_v", "heads_q_pos", "heads_k_pos", "heads_v_pos"])
def test_qkv_kinds_equal_hand_written_hooks(model, kind):
    res = activation_patch(model, CLEAN, CORRUPTED, METRIC, kind=kind, batch_size=10)
    ref = qkv_by_hand(model, kind, CLEAN, CORRUPTED, mean_of(METRIC))
    assert res.values.shape == ref.shape
    assert (res.values - ref).abs().max().item() <= ATOL
    assert (ref - res.corrupted).abs().max() > 1e-3, "the sweep is trivial"
    assert res.col_label == ("position" if kind.endswith("_pos") else "head")


@pytest.mark.parametrize("kind", ["heads_v", "heads_v_pos"])
def test_attribution_exact_for_values_on_affine_model(affine_model, kind):
    """With attention frozen the logits are affine in each head's values: attribution patching is exact."""
    exact = activation_patch(affine_model, CLEAN, CORRUPTED, METRIC, kind=kind)
    approx = attribution_patch(affine_model, CLEAN, CORRUPTED, METRIC, kind=kind)
    assert approx.rows == exact.rows and approx.cols == exact.cols
    assert (exact.values - exact.corrupted).abs().max() > 1e-2
    assert (approx.values - exact.values).abs().max().item() <= ATOL


def test_qkv_kinds_equal_intervenable_model(model):
    """heads_q equals pyvene's head_query_output swapped per head (an IntervenableModel loop)."""
    res = activation_patch(model, CLEAN, CORRUPTED, METRIC, kind="heads_q")
    for layer in range(model.cfg.n_layers):
        pv_model = pv.IntervenableModel([{"layer": layer, "component": "head_query_output", "unit": "h",
                                          "intervention_type": pv.VanillaIntervention}], model=model)
        for h in range(model.cfg.n_heads):
            _, out = pv_model(base=CORRUPTED, sources=[CLEAN], unit_locations={"sources->base": h})
            assert res.values[layer, h].item() == pytest.approx(mean_metric(METRIC, out.logits), abs=ATOL)
