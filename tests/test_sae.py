"""Sparse autoencoders (hookvene/sae.py) and their splicing into hook points (HookedModule.add_sae / saes()).

The maths is checked against formulas written out here (SAELens's definitions, documented in hookvene/sae.py);
scripts/compare_sae_lens.py checks the same against the sae-lens package itself."""

import json
import math

import pytest
import torch

import hookvene as pv
from hookvene.sae import SAE, SAEConfig, sae_site

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model():
    return pv.from_pretrained("ioi-gpt2").eval()


@pytest.fixture(scope="module")
def tokens(model):
    g = torch.Generator().manual_seed(0)
    return torch.randint(2, model.cfg.d_vocab, (3, 9), generator=g)


def random_sae(arch="standard", d_in=128, d_sae=512, hook=HOOK, seed=0, **cfg) -> SAE:
    """An SAE with every weight random (non-zero biases and thresholds, so that each term of the maths shows)."""
    if arch == "topk":
        cfg.setdefault("k", 16)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, hook_name=hook, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W") else 0.5))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=g) * 0.5)
    return sae


def reference_encode(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, object]:
    """SAELens's encode, written out: normalise, subtract b_dec, project, activate."""
    c, state = sae.cfg, None
    if c.normalize_activations == "constant_norm_rescale":
        state = math.sqrt(c.d_in) / x.norm(dim=-1, keepdim=True)
        x = x * state
    elif c.normalize_activations == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x, state = (x - mu) / (std + 1e-5), (mu, std)
    if c.apply_b_dec_to_input:
        x = x - sae.b_dec
    pre = x @ sae.W_enc + sae.b_enc
    if c.architecture == "standard":
        return torch.relu(pre), state
    if c.architecture == "jumprelu":
        return torch.where(pre > sae.threshold, torch.relu(pre), torch.zeros_like(pre)), state
    keep = pre >= pre.topk(c.k, dim=-1).values[..., -1:]  # the k largest (random floats: no ties)
    return torch.where(keep, torch.relu(pre), torch.zeros_like(pre)), state


def reference_decode(sae: SAE, acts: torch.Tensor, state: object) -> torch.Tensor:
    out = acts @ sae.W_dec + sae.b_dec
    if sae.cfg.normalize_activations == "constant_norm_rescale":
        out = out / state
    elif sae.cfg.normalize_activations == "layer_norm":
        out = out * state[1] + state[0]
    return out


VARIANTS = [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
    ("jumprelu", {"normalize_activations": "layer_norm"}),
    ("topk", {}),
    ("topk", {"normalize_activations": "constant_norm_rescale"}),
]


@pytest.mark.parametrize("arch,cfg", VARIANTS)
def test_encode_decode_forward_match_the_written_out_maths(arch, cfg):
    sae = random_sae(arch, **cfg)
    x = torch.randn(2, 5, 128)
    acts, state = reference_encode(sae, x)
    with torch.no_grad():
        got = sae.encode(x)
        torch.testing.assert_close(got, acts, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(got), reference_decode(sae, acts, state), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), reference_decode(sae, acts, state), atol=1e-5, rtol=1e-5)
        assert (got > 0).float().sum(-1).max() <= (16 if arch == "topk" else 512)
        with sae.error_term():
            torch.testing.assert_close(sae(x), x, atol=1e-5, rtol=1e-5)  # reconstruction + error = input


def test_topk_keeps_k_features_per_token():
    sae = random_sae("topk", k=7)
    acts = sae.encode(torch.randn(4, 3, 128))
    assert ((acts > 0).sum(-1) <= 7).all() and ((acts != 0).sum(-1) > 0).all()


@pytest.mark.parametrize("arch,cfg", VARIANTS)
def test_save_model_load_from_disk_round_trip_is_exact(tmp_path, arch, cfg):
    sae = random_sae(arch, **cfg)
    sae.cfg.metadata["model_name"] = "ioi-gpt2"
    sae.save_model(tmp_path / "sae")
    on_disk = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert on_disk["metadata"]["hook_name"] == HOOK and on_disk["architecture"] == arch  # SAELens's layout
    back = SAE.load_from_disk(tmp_path / "sae")
    assert back.cfg == sae.cfg
    for k, v in sae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(2, 4, 128)
    assert torch.equal(back(x), sae(x))


def test_older_flat_cfg_layout_loads(tmp_path):
    """SAELens before 6.0 wrote hook_name at the top and TopK as activation_fn_str="topk" + activation_fn_kwargs."""
    sae = random_sae("topk", k=5)
    sae.save_model(tmp_path)
    flat = {"architecture": "standard", "d_in": 128, "d_sae": 512, "hook_name": HOOK, "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 5}, "apply_b_dec_to_input": True, "normalize_activations": "none",
            "dtype": "float32", "device": "cpu", "model_name": "ioi-gpt2", "hook_layer": 1}
    (tmp_path / "cfg.json").write_text(json.dumps(flat))
    back = SAE.load_from_disk(tmp_path)
    assert back.cfg.architecture == "topk" and back.cfg.k == 5 and back.cfg.hook_name == HOOK
    x = torch.randn(3, 128)
    assert torch.equal(back.encode(x), sae.encode(x))


def test_corrupt_or_mismatched_files_give_clear_errors(tmp_path, model, tokens):
    sae = random_sae("jumprelu")
    folder = tmp_path / "sae"
    sae.save_model(folder)
    with pytest.raises(FileNotFoundError, match="cfg.json and sae_weights.safetensors"):
        SAE.load_from_disk(tmp_path / "nowhere")
    (folder / "sae_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SAE.load_from_disk(folder)
    sae.save_model(folder)
    (folder / "cfg.json").write_text("{ broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        SAE.load_from_disk(folder)
    (folder / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": 128, "d_sae": 512}))
    with pytest.raises(ValueError, match="architecture 'gated' is not supported; choose one of standard, jumprelu"):
        SAE.load_from_disk(folder)
    (folder / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": 64, "d_sae": 512}))
    with pytest.raises(ValueError, match=r"W_enc is \(128, 512\), expected \(64, 512\)"):
        SAE.load_from_disk(folder)  # weights of another width than the config says
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 128, "d_sae": 512}))
    with pytest.raises(ValueError, match=r"unexpected \['threshold'\]"):
        SAE.load_from_disk(folder)
    with pytest.raises(ValueError, match="normalize_activations must be one of"):
        SAEConfig(d_in=4, d_sae=8, normalize_activations="covariance_whitening")
    with pytest.raises(ValueError, match="a topk SAE needs k"):
        SAEConfig(d_in=4, d_sae=8, architecture="topk")

    wide = random_sae(d_in=64, d_sae=128)  # trained for a 64-wide model, spliced into a 128-wide one
    with pytest.raises(ValueError, match=r"d_in=64, but the activation at 'blocks.1.hook_resid_pre' has width 128"):
        model.run_with_saes(tokens, saes=[wide])
    assert not model.acts_to_saes  # the failed call left nothing spliced
    with pytest.raises(ValueError, match="unknown hook point .*'blocks.1.hook_resid_pre'"):
        model.run_with_saes(tokens, saes=[random_sae(hook="blocks.1.hook_resid_prex")])


def test_from_pretrained_offline_names_the_local_route(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"To use it offline, copy that folder .* hookvene.SAE.load_from_disk\(path\)"):
        SAE.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    with pytest.raises(ValueError, match="unknown SAE release 'nonsense'"):
        SAE.from_pretrained("nonsense", "x")


# -- splicing ------------------------------------------------------------------------------------------------------

def test_spliced_reconstruction_replaces_the_activation(model, tokens):
    sae = random_sae()
    seen = {}

    def after(x, hook):  # block 1's attention input is computed from the (spliced) residual stream
        seen["resid"] = x

    with torch.no_grad():
        plain = model(tokens).logits
        out, cache = model.run_with_cache_with_saes(tokens, saes=[sae], names_filter=lambda n: "hook_resid_pre" in n)
        expected = sae(cache[HOOK])  # the host hook holds the SAE's input
        model.run_with_hooks_with_saes(tokens, saes=[sae], fwd_hooks=[("blocks.1.hook_resid_mid", after)])
    torch.testing.assert_close(cache[HOOK + ".hook_sae_input"], cache[HOOK])
    torch.testing.assert_close(cache[HOOK + ".hook_sae_output"], expected)
    assert not torch.allclose(out.logits, plain, atol=1e-3)  # a random SAE changes the forward
    assert not model.acts_to_saes and HOOK + ".hook_sae_acts_post" not in model.hook_dict


def test_error_term_keeps_the_forward_and_shows_features(model, tokens):
    sae = random_sae("jumprelu")
    with torch.no_grad():
        plain = model(tokens).logits
        out, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)
    torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=1e-5)
    acts = cache[sae_site(sae)]
    assert acts.shape == (3, 9, 512) and (acts > 0).any()
    for name in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_output", "hook_sae_recons",
                 "hook_sae_error"):
        assert f"{HOOK}.{name}" in cache
    torch.testing.assert_close(cache[HOOK + ".hook_sae_recons"] + cache[HOOK + ".hook_sae_error"], cache[HOOK],
                               atol=1e-5, rtol=1e-5)
    assert sae.use_error_term is False  # the override lasted for the call only


def test_editing_features_under_the_error_term_changes_the_output_by_their_decoded_difference(model, tokens):
    sae = random_sae()
    feature = 3

    def zero(acts, hook):
        acts = acts.clone()
        acts[..., feature] = 0
        return acts

    with torch.no_grad(), model.saes([sae], use_error_term=True):
        _, clean = model.run_with_cache(tokens, names_filter=[HOOK, sae_site(sae)])
        with model.hooks([(sae_site(sae), zero)]):
            _, edited = model.run_with_cache(tokens, names_filter=[sae_site(sae, "hook_sae_output")])
    expected = clean[HOOK] - clean[sae_site(sae)][..., feature, None] * sae.W_dec[feature]
    torch.testing.assert_close(edited[sae_site(sae, "hook_sae_output")], expected, atol=1e-5, rtol=1e-5)

    def zero_in_place(acts, hook):  # returns nothing: the edit is seen through the tensor's version counter
        acts[..., feature] = 0

    with torch.no_grad():
        with model.saes([sae], use_error_term=True), model.hooks([(sae_site(sae), zero_in_place)]):
            _, in_place = model.run_with_cache(tokens, names_filter=[sae_site(sae, "hook_sae_output")])
    torch.testing.assert_close(in_place[sae_site(sae, "hook_sae_output")], expected, atol=1e-5, rtol=1e-5)


def test_context_restores_everything_even_on_error(model, tokens):
    outer, inner = random_sae(seed=1), random_sae(seed=2)
    model.add_sae(outer)
    try:
        with pytest.raises(RuntimeError, match="boom"), model.saes([inner]):
            assert model.acts_to_saes[HOOK] is inner
            raise RuntimeError("boom")
        assert model.acts_to_saes == {HOOK: outer}  # the SAE spliced before the block is back
        with model.saes([inner], use_error_term=True):
            assert inner.use_error_term
        assert not inner.use_error_term
    finally:
        model.reset_saes()
    assert not model.acts_to_saes and not model.has_hooks()
    with pytest.raises(ValueError, match="no SAE is spliced at"):
        model.reset_saes(HOOK)
    with pytest.raises(ValueError, match="two SAEs for one hook point"):
        model.run_with_saes(tokens, saes=[outer, inner])
    assert not model.acts_to_saes


def test_sae_on_hook_z_reads_heads_concatenated(model, tokens):
    hook = "blocks.2.attn.hook_z"
    sae = random_sae(d_in=model.cfg.n_heads * model.cfg.d_head, hook=hook, reshape_activations="hook_z")
    with torch.no_grad():
        plain = model(tokens).logits
        out, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True,
                                                    names_filter=[hook, f"{hook}.hook_sae_acts_post"])
    torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=1e-5)
    z = cache[hook]
    torch.testing.assert_close(cache[f"{hook}.hook_sae_acts_post"], sae.encode(z))  # (..., heads, d_head)


def test_caching_features_stores_only_what_was_asked(model, tokens):
    sae = random_sae()
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], names_filter=sae_site(sae))
    assert list(cache) == [sae_site(sae)]


# -- pyvene interventions on SAE features -------------------------------------------------------------------------

def test_intervenable_model_interchanges_zeroes_and_steers_spliced_features(model, tokens):
    """A spliced SAE's `hook_sae_acts_post` is an intervention site; feature indices are the subspaces."""
    sae = random_sae(seed=3)
    site, feats, pos = sae_site(sae), [5, 17, 40], 4
    base, source = tokens[:2], tokens[1:3]
    with torch.no_grad(), model.saes([sae], use_error_term=True):
        _, src_cache = model.run_with_cache(source, names_filter=site)

        def by_hand(acts, hook):  # the oracle: write the source's features at one position
            acts = acts.clone()
            acts[:, pos, feats] = src_cache[site][:, pos, feats]
            return acts

        expected = model.run_with_hooks(base, fwd_hooks=[(site, by_hand)]).logits
        ivm = pv.IntervenableModel([{"layer": 0, "component": site, "unit": "pos"}], model)
        _, got = ivm({"input_ids": base}, [{"input_ids": source}], unit_locations={"sources->base": pos},
                     subspaces=[[feats, feats]])
        torch.testing.assert_close(got.logits, expected, atol=1e-5, rtol=1e-5)

        zero = pv.IntervenableModel([{"layer": 0, "component": site, "unit": "pos",
                                      "intervention_type": pv.ZeroIntervention}], model)
        _, zeroed = zero({"input_ids": base}, unit_locations={"base": pos}, subspaces=[[feats, feats]])
        _, cache = model.run_with_cache(base, names_filter=[HOOK, site])
        shift = (cache[site][:, pos, feats] @ sae.W_dec[feats])  # zeroing removes exactly the decoded features
        steer = pv.IntervenableModel([{"layer": 0, "component": site, "unit": "pos",
                                       "intervention_type": pv.AdditionIntervention}], model)
        amount = torch.zeros(sae.cfg.d_sae)
        amount[feats] = 2.0
        _, steered = steer({"input_ids": base}, unit_locations={"base": pos}, source_representations=amount)
        for out, delta in ((zeroed, -shift), (steered, 2.0 * sae.W_dec[feats].sum(0))):
            def add(x, hook, delta=delta):
                x = x.clone()
                x[:, pos] += delta
                return x
            ref = model.run_with_hooks(base, fwd_hooks=[(HOOK + ".hook_sae_output", add)]).logits
            torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)
    assert not model.acts_to_saes


def test_jumprelu_autoencoder_intervention_follows_pyvene(model, tokens):
    """pyvene's formula: z = relu(pre) * (pre > threshold); base takes the source's latents at the subspaces;
    out = z W_dec + b_dec (the reconstruction, no error term). load_sae folds apply_b_dec_to_input into b_enc."""
    sae = random_sae("jumprelu", seed=4)
    iv = pv.JumpReLUAutoencoderIntervention(embed_dim=128, low_rank_dimension=512).load_sae(sae)
    assert iv.keep_last_dim and not iv.flattens_units
    b, s = torch.randn(2, 3, 128), torch.randn(2, 3, 128)
    with torch.no_grad():
        zb, zs = sae.encode(b), sae.encode(s)
        torch.testing.assert_close(iv.encode(b), zb, atol=1e-4, rtol=1e-4)
        mixed = zb.clone()
        mixed[..., [1, 9]] = zs[..., [1, 9]]
        torch.testing.assert_close(iv(b, s, [[1, 9]]), sae.decode(mixed), atol=1e-4, rtol=1e-4)
        first = zb.clone()
        first[..., :128] = zs[..., :128]  # no subspaces: the first interchange_dim (= embed_dim) latents, as pyvene
        torch.testing.assert_close(iv(b, s), sae.decode(first), atol=1e-4, rtol=1e-4)

        ivm = pv.IntervenableModel([{"layer": 1, "component": "block_input", "unit": "pos",
                                     "intervention": iv}], model)
        _, out = ivm({"input_ids": tokens[:2]}, [{"input_ids": tokens[1:3]}], unit_locations={"sources->base": 2},
                     subspaces=[[[7], [7]]])
        _, bc = model.run_with_cache(tokens[:2], names_filter=HOOK)
        _, sc = model.run_with_cache(tokens[1:3], names_filter=HOOK)
        z = sae.encode(bc[HOOK][:, 2])
        z[:, 7] = sae.encode(sc[HOOK][:, 2])[:, 7]

        def write(x, hook):
            x = x.clone()
            x[:, 2] = sae.decode(z)
            return x
        torch.testing.assert_close(out.logits, model.run_with_hooks(tokens[:2], fwd_hooks=[(HOOK, write)]).logits,
                                   atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="computes relu/jumprelu SAEs"):
        pv.JumpReLUAutoencoderIntervention(embed_dim=128, low_rank_dimension=512).load_sae(random_sae("topk"))
    with pytest.raises(ValueError, match="needs low_rank_dimension"):
        pv.JumpReLUAutoencoderIntervention(embed_dim=128)


def test_autoencoder_intervention_follows_pyvene():
    iv = pv.AutoencoderIntervention(embed_dim=8, latent_dim=32)
    assert {"autoencoder.encoder.0.weight", "autoencoder.decoder.0.bias"} <= set(iv.state_dict())  # pyvene's names
    assert iv.flattens_units
    with torch.no_grad():
        for p in iv.parameters():
            p.normal_()
    b, s = torch.randn(3, 8), torch.randn(3, 8)
    enc, dec = iv.autoencoder.encoder[0], iv.autoencoder.decoder[0]
    zb, zs = torch.relu((b - dec.bias) @ enc.weight.T + enc.bias), torch.relu((s - dec.bias) @ enc.weight.T + enc.bias)
    iv.set_interchange_dim(torch.tensor([2, 30]))
    mixed = zb.clone()
    mixed[:, [2, 30]] = zs[:, [2, 30]]
    with torch.no_grad():
        torch.testing.assert_close(iv(b, s), mixed @ dec.weight.T + dec.bias, atol=1e-5, rtol=1e-5)
        assert iv.settings() == {"interchange_dim": [2, 30]}  # JSON-able, for IntervenableModel.save
        mixed[:, 4] = zs[:, 4]
        mixed[:, [2, 30]] = zb[:, [2, 30]]
        torch.testing.assert_close(iv(b, s, [[4]]), mixed @ dec.weight.T + dec.bias, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs latent_dim"):
        pv.AutoencoderIntervention(embed_dim=8)


# -- feature sweeps -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ioi(model):
    from hookvene.experiments.ioi import corrupt, make_ioi_dataset, tokenize_ioi

    clean = make_ioi_dataset(6, seed=1, templates=[0])
    return tokenize_ioi(clean, model.tokenizer), tokenize_ioi(corrupt(clean, "abc"), model.tokenizer)


def test_feature_patch_equals_a_cell_by_cell_loop(model, ioi):
    from hookvene.experiments import activation_patch, attribution_patch, compare
    from hookvene.experiments.metrics import logit_diff

    clean, corrupted = ioi
    metric = logit_diff(corrupted["io_ids"], corrupted["s_ids"], pos=corrupted["end_pos"])
    sae = random_sae(d_sae=256, hook="blocks.2.hook_resid_pre", seed=5)
    feats = list(range(0, 256, 16))
    grid = activation_patch(model, clean, corrupted, metric, sae=sae, features=feats, batch_size=40)
    n_pos = clean["input_ids"].shape[1]
    assert grid.values.shape == (len(feats), n_pos) and grid.kind == "sae_features"
    assert 0 < grid.extra["ran"] < len(feats) * n_pos  # cells whose activations agree did not run
    assert not model.acts_to_saes

    site, inputs = sae_site(sae), {k: clean[k] for k in ("input_ids", "attention_mask")}
    corrupted_inputs = {k: corrupted[k] for k in ("input_ids", "attention_mask")}
    ex = torch.arange(6)
    with torch.no_grad(), model.saes([sae], use_error_term=True):
        _, cache = model.run_with_cache(**inputs, names_filter=site)
        for i, f in enumerate(feats):
            for p in range(n_pos):
                def write(acts, hook, f=f, p=p):
                    acts = acts.clone()
                    acts[:, p, f] = cache[site][:, p, f]
                    return acts
                logits = model.run_with_hooks(**corrupted_inputs, fwd_hooks=[(site, write)]).logits
                assert abs(float(metric(logits, ex).mean()) - float(grid.values[i, p])) < 1e-4, (f, p)
        plain = float(metric(model(**corrupted_inputs).logits, ex).mean())
    assert abs(grid.corrupted - plain) < 1e-4  # the error term keeps the model's own corrupted run

    approx = attribution_patch(model, clean, corrupted, metric, sae=sae, features=feats)
    assert approx.values.shape == grid.values.shape
    assert compare(grid, approx)["correlation"] > 0.6  # 0.76 measured: a random SAE makes large, nonlinear patches
    with pytest.raises(ValueError, match="feature sweeps are kind='sae_features' with sae="):
        activation_patch(model, clean, corrupted, metric, kind="sae_features")
    with pytest.raises(ValueError, match="feature index 256 is out of range: this SAE has d_sae=256"):
        activation_patch(model, clean, corrupted, metric, sae=sae, features=[256])


# -- training -------------------------------------------------------------------------------------------------------

def synthetic(n_batches=60, batch=256, d=32, n_true=64, seed=0):
    """Activations that are sparse sums of `n_true` unit directions (about 3 per row): an SAE should find them."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=-1)
    out = []
    for _ in range(n_batches):
        on = torch.rand(batch, n_true, generator=g) < 3 / n_true
        out.append((on * (1 + torch.rand(batch, n_true, generator=g))) @ dirs)
    return out


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_train_sae_learns_a_sparse_code(arch):
    import itertools

    from hookvene.sae_training import train_sae

    sae = SAE(SAEConfig(d_in=32, d_sae=128, architecture=arch, k=4 if arch == "topk" else None, hook_name=HOOK))
    log = train_sae(sae, itertools.cycle(synthetic()), steps=150, lr=1e-2, l1_coefficient=1.0, log_every=10)
    # measured: explained variance 0.79 (standard) / 0.87 (topk), L0 6.6 / 3.9, from 0.04 / 0.33 at step 0
    assert log.mse[-1] < 0.3 * log.mse[0] and log.explained_variance[-1] > 0.65
    assert log.l0[-1] < 10 and log.tokens == 150 * 256
    if arch == "topk":
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(128))  # unit-norm decoder rows


def test_train_sae_errors_name_the_problem():
    from hookvene.sae_training import train_sae

    with pytest.raises(ValueError, match="trains 'standard' .* and 'topk' SAEs; this one is 'jumprelu'"):
        train_sae(random_sae("jumprelu"), synthetic(1), steps=1)
    with pytest.raises(ValueError, match=r"must be \(tokens, d_in=128\); got shape \(256, 32\)"):
        train_sae(random_sae(), synthetic(1), steps=1)
    with pytest.raises(ValueError, match="ran out after 2 steps"):
        train_sae(SAE(SAEConfig(d_in=32, d_sae=64)), synthetic(2), steps=5)


def test_activation_batches_stream_real_tokens_and_stop_at_the_hook(model):
    from hookvene.sae_training import activation_batches

    ids = torch.randint(2, 90, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 4:] = 0  # two padding positions: not training data
    later = []
    with model.hooks([("blocks.3.hook_resid_post", lambda x, h: later.append(1))]):
        data = [{"input_ids": ids, "attention_mask": mask}]
        batches = list(activation_batches(model, data, "blocks.1.hook_resid_pre", batch_size=10, epochs=1))
    assert [b.shape for b in batches] == [(10, 128), (10, 128), (2, 128)] and not later  # 22 real tokens
    _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter="blocks.1.hook_resid_pre")
    expected = cache["blocks.1.hook_resid_pre"][mask.bool()]
    got = torch.cat(batches)
    assert torch.allclose(got[got[:, 0].argsort()], expected[expected[:, 0].argsort()])  # the same rows, shuffled
    with pytest.raises(ValueError, match="unknown hook point 'blocks.1.hook_resid'"):
        next(activation_batches(model, [ids], "blocks.1.hook_resid"))


def test_train_sae_reads_activation_shards_from_disk(model, tokens, tmp_path):
    """Where the trainer meets collect_activations: batches read back from safetensors shards."""
    import itertools

    from hookvene.sae_training import train_sae

    store = pv.collect_activations(model, tokens, [HOOK], batch_size=2, out=str(tmp_path / "acts"))
    sae = SAE(SAEConfig(d_in=128, d_sae=256, hook_name=HOOK))
    log = train_sae(sae, itertools.cycle(list(store.batches(HOOK, batch_size=9, shuffle=True))), steps=20,
                    log_every=5)
    assert log.tokens == 20 * 9 and log.mse[-1] < log.mse[0]
