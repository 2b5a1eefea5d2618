"""Generation (hookvene/generate.py): `model.generate` with hooks attached, and `IntervenableModel.generate`.

Every check compares against an independent computation:
- the KV-cached loop against the same loop without a cache (`use_cache=False`) and against `transformers`' own
  greedy `generate` on the same weights (left-padded batches included);
- intervened generation against a hand-written loop that recomputes the whole sequence at every step with
  `model.run_with_hooks` and a plain hook function adding the vector at the positions the semantics name;
- batched left-padded generation against one example at a time.
Models are tiny random checkpoints made locally (GPT-2, GPT-Neo with a local-attention window shorter than the
sequence, T5 for the decoder side); weights are redrawn larger than HF's init so greedy choices are not near-ties.
"""

import pytest
import torch

import hookvene as pv
from tests.helpers import save_checkpoint, tiny_gpt2

VOCAB, N_CTX, D = 101, 48, 32
NEW = 6  # new tokens per generation: few, the cost is per step
TOL = 1e-4


# --- models ------------------------------------------------------------------------------------------------------


def _sharpen(hf, seed: int):
    """Redraw weights larger than HF's init: peaked logits, so argmax never hinges on float noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name.split(".")[-2] or "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.1))
    return hf


def hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=N_CTX, n_embd=D, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return _sharpen(GPT2LMHeadModel(cfg).eval(), 1)


def hf_neo():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=VOCAB, max_position_embeddings=N_CTX, hidden_size=D, num_layers=2, num_heads=4,
                       intermediate_size=48, attention_types=[[["global", "local"], 1]], window_size=4,
                       resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0)
    return _sharpen(GPTNeoForCausalLM(cfg).eval(), 2)


def hf_t5():
    import transformers

    # equal encoder/decoder depth: transformers' own generate breaks on unequal ones (its cache is sized by
    # num_layers), and we compare with it
    cfg = transformers.T5Config(vocab_size=61, d_model=D, d_kv=12, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def pairs():
    """arch -> (transformers model, hookvene model sharing its weights)."""
    out = {}
    for arch, make in (("gpt2", hf_gpt2), ("neo", hf_neo)):
        hf = make()
        out[arch] = (hf, pv.from_pretrained(hf))
    return out


@pytest.fixture(params=["gpt2", "neo"])
def arch(request):
    return request.param


@pytest.fixture
def pair(pairs, arch):
    hf, model = pairs[arch]
    assert not model.has_hooks()
    yield hf, model
    leftover = [n for n, p in model.hook_dict.items() if p.has_hooks]
    model.reset_hooks()
    assert not leftover, f"hooks left attached after the test: {leftover}"


@pytest.fixture
def model(pair):
    return pair[1]


@pytest.fixture(scope="module")
def t5_pair():
    hf = hf_t5()
    return hf, pv.from_pretrained(hf)


def left_padded(batch: int = 3, pos: int = 7, pad_lengths=(0, 2, 4), vocab: int = VOCAB, pad_id: int = 0):
    """Token ids (avoiding the eos/pad id 0) and an attention mask with row i left-padded by pad_lengths[i]."""
    ids = torch.randint(1, vocab, (batch, pos), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    for row, n in enumerate(pad_lengths[:batch]):
        ids[row, :n] = pad_id
        mask[row, :n] = 0
    return ids, mask


def vec(d: int = D, scale: float = 1.5, seed: int = 3) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)) * scale


def mlp_out_names(model, prefix: str = "") -> list[str]:
    return [n for n in model.hook_dict if n.startswith(prefix + "blocks.") and n.endswith("hook_mlp_out")]


def steering_config(n_layers: int, component: str = "mlp_output", iv_type=None):
    return [{"layer": layer, "component": component, "intervention_type": iv_type or pv.AdditionIntervention}
            for layer in range(n_layers)]


# --- the reference: recompute everything, no cache ---------------------------------------------------------------


def manual_greedy(model, ids, mask, new, names=(), add=None, positions=None):
    """Greedy decoding that recomputes the whole sequence each step (no cache) with a hand-written hook adding
    `add` at absolute `positions` (a set; None = every position) of each hook in `names`.
    Returns (ids, per-step logits)."""
    mask = torch.ones_like(ids) if mask is None else mask

    def hook(x, hook):
        if positions is None:
            return x + add
        x = x.clone()
        for p in sorted(positions):
            if p < x.shape[1]:
                x[:, p] += add
        return x

    fwd = [(n, hook) for n in names] if add is not None else []
    scores = []
    with torch.no_grad():
        for _ in range(new):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model.run_with_hooks(ids, attention_mask=mask, position_ids=position_ids,
                                          fwd_hooks=fwd).logits[:, -1]
            scores.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids, torch.stack(scores, dim=1)


def manual_greedy_t5(model, enc_ids, enc_mask, new, names=(), add=None):
    """The same for T5: decoder ids start with decoder_start_token_id; the whole decoder is rerun each step."""
    dec = torch.full((enc_ids.shape[0], 1), model.cfg.decoder_start_token_id, dtype=torch.long)
    fwd = [(n, lambda x, hook: x + add) for n in names] if add is not None else []
    scores = []
    with torch.no_grad():
        for _ in range(new):
            logits = model.run_with_hooks(input_ids=enc_ids, attention_mask=enc_mask, decoder_input_ids=dec,
                                          fwd_hooks=fwd).logits[:, -1]
            scores.append(logits)
            dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], dim=1)
    return dec, torch.stack(scores, dim=1)


def assert_same(ids, ref_ids, scores=None, ref_scores=None):
    assert ids.shape == ref_ids.shape, (tuple(ids.shape), tuple(ref_ids.shape))
    assert torch.equal(ids, ref_ids), f"\n{ids}\n!=\n{ref_ids}"
    if scores is not None:
        err = (scores - ref_scores).abs().max().item()
        assert err < TOL, f"logits differ by {err}"


# --- hook-level generation (model.generate) ----------------------------------------------------------------------


def test_cache_equals_no_cache(model):
    ids, mask = left_padded()
    out, scores = model.generate(ids, mask, max_new_tokens=NEW, output_scores=True)
    ref, ref_scores = model.generate(ids, mask, max_new_tokens=NEW, output_scores=True, use_cache=False)
    assert out.shape == (3, 7 + NEW) and scores.shape == (3, NEW, VOCAB)
    assert_same(out, ref, scores, ref_scores)
    manual, manual_scores = manual_greedy(model, ids, mask, NEW)  # and the loop written here
    assert_same(out, manual, scores, manual_scores)


def test_equals_transformers_greedy_left_padded(pair):
    hf, model = pair
    ids, mask = left_padded()
    theirs = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                         min_new_tokens=NEW, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ours, scores = model.generate(ids, mask, max_new_tokens=NEW, output_scores=True)
    assert_same(ours, theirs.sequences, scores, torch.stack(theirs.logits, dim=1))


def test_eos_stops_and_pads_like_transformers(pair):
    hf, model = pair
    ids, mask = left_padded()
    free = model.generate(ids, mask, max_new_tokens=NEW)
    eos = int(free[0, 7 + 1])  # row 0 emits it at its second new token
    pad = VOCAB - 1
    ours = model.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)
    theirs = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                         eos_token_id=eos, pad_token_id=pad)
    assert_same(ours, theirs)
    first = (ours[0, 7:] == eos).nonzero()[0, 0].item()
    assert (ours[0, 7 + first + 1:] == pad).all()  # after eos: padding only
    # every row finished -> generation stops early
    all_eos = model.generate(ids[:1], mask[:1], max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)
    assert all_eos.shape[1] == 7 + first + 1 < 7 + NEW
    assert all_eos[0, -1].item() == eos


def test_hooks_fire_on_every_step(model):
    """TransformerLens style: hooks attached with `model.hooks()` fire on the prompt pass (whole prompt), then
    once per decode pass on the new position only (the KV cache holds the rest)."""
    ids, mask = left_padded()
    seen = {"resid": [], "pattern": [], "logits": []}
    fwd = [("blocks.0.hook_resid_pre", lambda x, h: seen["resid"].append(tuple(x.shape))),
           ("blocks.1.attn.hook_pattern", lambda x, h: seen["pattern"].append(tuple(x.shape))),
           ("hook_logits", lambda x, h: seen["logits"].append(tuple(x.shape)))]
    with model.hooks(fwd_hooks=fwd):
        out = model.generate(ids, mask, max_new_tokens=NEW)
    assert not model.has_hooks()
    assert out.shape == (3, 7 + NEW)
    # NEW tokens need NEW passes: the prompt pass gives the first token, each decode pass one more
    assert seen["resid"] == [(3, 7, D)] + [(3, 1, D)] * (NEW - 1)
    assert seen["logits"] == [(3, 7, VOCAB)] + [(3, 1, VOCAB)] * (NEW - 1)
    assert seen["pattern"] == [(3, 4, 7, 7)] + [(3, 4, 1, 7 + k) for k in range(1, NEW)]  # keys grow: the cache


def test_hook_steering_with_model_generate_equals_manual(model):
    """A steering hook attached around `model.generate` acts on every pass: the same as adding the vector at
    every position of the fully recomputed sequence."""
    ids, mask = left_padded()
    v = vec()
    names = mlp_out_names(model)
    with model.hooks(fwd_hooks=[(n, lambda x, hook: x + v) for n in names]):
        out, scores = model.generate(ids, mask, max_new_tokens=NEW, output_scores=True)
    ref, ref_scores = manual_greedy(model, ids, mask, NEW, names, v)
    assert_same(out, ref, scores, ref_scores)
    assert not torch.equal(out, model.generate(ids, mask, max_new_tokens=NEW))  # the vector matters


def test_hooks_removed_after_error_in_generate(model):
    ids, mask = left_padded()
    calls = []

    def boom(x, hook):
        calls.append(x.shape[1])
        if len(calls) == 3:
            raise RuntimeError("hook failed on the third pass")

    with pytest.raises(RuntimeError, match="third pass"):
        with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", boom)]):
            model.generate(ids, mask, max_new_tokens=NEW)
    assert calls == [7, 1, 1]
    assert not model.has_hooks()
    # and the model still generates exactly as before
    assert_same(model.generate(ids, mask, max_new_tokens=NEW), manual_greedy(model, ids, mask, NEW)[0])


# --- IntervenableModel.generate ------------------------------------------------------------------------------------


def test_steering_every_step_equals_manual_recompute(model):
    """Default semantics (unit_locations=None): every position of the prompt and of every generated token."""
    ids, mask = left_padded()
    v = vec()
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    original, (out, scores) = iv.generate({"input_ids": ids, "attention_mask": mask}, source_representations=v,
                                          max_new_tokens=NEW, output_scores=True, output_original_output=True)
    ref, ref_scores = manual_greedy(model, ids, mask, NEW, mlp_out_names(model), v)
    assert_same(out, ref, scores, ref_scores)
    plain, plain_scores = original
    assert_same(plain, manual_greedy(model, ids, mask, NEW)[0])
    assert not torch.equal(out, plain)
    assert not model.has_hooks()


def test_steering_with_one_vector_per_example(model):
    ids, mask = left_padded()
    vs = torch.stack([vec(seed=s) for s in range(3)])  # (batch, d): one vector per example
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    _, out = iv.generate({"input_ids": ids, "attention_mask": mask}, source_representations=vs, max_new_tokens=NEW)
    for row in range(3):
        ref, _ = manual_greedy(model, ids[row:row + 1], mask[row:row + 1], NEW, mlp_out_names(model), vs[row])
        assert_same(out[row:row + 1], ref)


@pytest.mark.parametrize("on_generated", [False, True])
def test_intervene_on_prompt_at_unit_locations(model, on_generated):
    """unit_locations name prompt positions (absolute, in the padded prompt); only those are touched on the
    prompt pass; with intervene_on_generated=True every new position is steered as well."""
    ids, mask = left_padded()
    v = vec(scale=3.0)
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    kw = {"intervene_on_generated": True} if on_generated else {}
    _, (out, scores) = iv.generate({"input_ids": ids, "attention_mask": mask}, unit_locations={"base": [4, 6]},
                                   intervene_on_prompt=True, source_representations=v, max_new_tokens=NEW,
                                   output_scores=True, **kw)
    positions = {4, 6} | (set(range(7, 7 + NEW)) if on_generated else set())
    ref, ref_scores = manual_greedy(model, ids, mask, NEW, mlp_out_names(model), v, positions)
    assert_same(out, ref, scores, ref_scores)
    plain = model.generate(ids, mask, max_new_tokens=NEW)
    assert not torch.equal(out, plain)


@pytest.mark.parametrize("on_prompt", [True, False])
def test_generated_steps_restrict_decode_passes(model, on_prompt):
    """generated_steps=[0, 2]: decode pass 0 reads the first new token (absolute position = prompt length)."""
    ids, mask = left_padded()
    v = vec(scale=3.0)
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    _, (out, scores) = iv.generate({"input_ids": ids, "attention_mask": mask}, source_representations=v,
                                   intervene_on_prompt=on_prompt, generated_steps=[0, 2], max_new_tokens=NEW,
                                   output_scores=True)
    positions = (set(range(7)) if on_prompt else set()) | {7 + 0, 7 + 2}
    ref, ref_scores = manual_greedy(model, ids, mask, NEW, mlp_out_names(model), v, positions)
    assert_same(out, ref, scores, ref_scores)
    if not on_prompt:  # the prompt pass is untouched: the first new token is the un-intervened one
        assert torch.equal(out[:, :8], model.generate(ids, mask, max_new_tokens=1))
        everything = manual_greedy(model, ids, mask, NEW, mlp_out_names(model), v, set(range(7, 7 + NEW)))[0]
        assert not torch.equal(out, everything)  # steps 1, 3, 4 really were skipped


@pytest.mark.parametrize("on_prompt", [True, False])
def test_collect_during_generation(model, on_prompt):
    """A CollectIntervention collects on every pass it acts on: the whole prompt on the prompt pass, then the one
    new position per decode pass. The list is pyvene's layout (one tensor per example per hook call, batch dim
    dropped), so each pass gives `batch` tensors; stacked, a decode pass is (b, 1, d). The values are the
    activations the un-intervened generation computes."""
    ids, mask = left_padded()
    iv = pv.IntervenableModel([{"layer": 1, "component": "mlp_output",
                                "intervention_type": pv.CollectIntervention}], model)
    (original, acts), out = iv.generate({"input_ids": ids, "attention_mask": mask}, intervene_on_prompt=on_prompt,
                                        max_new_tokens=NEW)
    assert original is None
    passes = [torch.stack(acts[i:i + 3]) for i in range(0, len(acts), 3)]  # batch 3: regroup per pass
    expected = ([(3, 7, D)] if on_prompt else []) + [(3, 1, D)] * (NEW - 1)
    assert len(acts) == 3 * len(expected)
    assert [tuple(a.shape) for a in passes] == expected
    recorded = []
    with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", lambda x, h: recorded.append(x.clone()))]):
        plain = model.generate(ids, mask, max_new_tokens=NEW)
    assert torch.equal(out, plain)  # collecting changes nothing
    for a, r in zip(passes, recorded if on_prompt else recorded[1:], strict=True):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=0)


def test_batched_left_padded_equals_per_example(model):
    ids, mask = left_padded()
    v = vec()
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    batch_plain, batch_plain_scores = model.generate(ids, mask, max_new_tokens=NEW, output_scores=True)
    _, (batch_steer, batch_steer_scores) = iv.generate({"input_ids": ids, "attention_mask": mask},
                                                       source_representations=v, max_new_tokens=NEW,
                                                       output_scores=True)
    for row, pad in enumerate((0, 2, 4)):
        one = ids[row:row + 1, pad:]  # the example alone, unpadded
        plain, plain_scores = model.generate(one, max_new_tokens=NEW, output_scores=True)
        _, (steer, steer_scores) = iv.generate({"input_ids": one}, source_representations=v, max_new_tokens=NEW,
                                               output_scores=True)
        assert_same(batch_plain[row:row + 1, pad:], plain, batch_plain_scores[row:row + 1], plain_scores)
        assert_same(batch_steer[row:row + 1, pad:], steer, batch_steer_scores[row:row + 1], steer_scores)


def test_seeded_sampling_is_reproducible(model):
    ids, mask = left_padded()
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5, top_k=40, top_p=0.95)
    a = model.generate(ids, mask, seed=11, **kw)
    b = model.generate(ids, mask, seed=11, **kw)
    assert torch.equal(a, b)
    others = [model.generate(ids, mask, seed=s, **kw) for s in (12, 13)]
    assert any(not torch.equal(a, o) for o in others)  # another seed, another sample
    # the global RNG is used without seed=, so torch.manual_seed makes it reproducible too
    torch.manual_seed(5)
    c = model.generate(ids, mask, **kw)
    torch.manual_seed(5)
    assert torch.equal(c, model.generate(ids, mask, **kw))
    # top_k=1 leaves one candidate: sampling is greedy
    greedy = model.generate(ids, mask, max_new_tokens=NEW)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=NEW, do_sample=True, top_k=1, seed=0), greedy)
    # a tiny nucleus keeps only the top token too
    assert torch.equal(model.generate(ids, mask, max_new_tokens=NEW, do_sample=True, top_p=1e-6, seed=0), greedy)
    # and through IntervenableModel.generate
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    s1 = iv.generate({"input_ids": ids, "attention_mask": mask}, source_representations=vec(), seed=3, **kw)[1]
    s2 = iv.generate({"input_ids": ids, "attention_mask": mask}, source_representations=vec(), seed=3, **kw)[1]
    assert torch.equal(s1, s2)


def test_sampling_distribution_follows_filters():
    """pick_next on fixed logits: top-k and top-p restrict the support; temperature sharpens."""
    from hookvene.models.common import pick_next

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    topk = pick_next(logits, True, 1.0, 2, None, g)
    assert set(topk.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # top_p=0.8: the smallest prefix with mass >= 0.8
    keep = int((probs.cumsum(-1) < 0.8).sum()) + 1
    topp = pick_next(logits, True, 1.0, None, 0.8, g)
    assert set(topp.tolist()) == set(range(keep))
    cold = pick_next(logits, True, 0.05, None, None, g)
    assert (cold == 0).float().mean() > 0.99


# --- bad input ------------------------------------------------------------------------------------------------------


def test_length_errors(model):
    ids, mask = left_padded()
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    base = {"input_ids": ids, "attention_mask": mask}
    with pytest.raises(ValueError, match="context"):
        model.generate(ids, mask, max_new_tokens=N_CTX)
    with pytest.raises(ValueError, match="context"):
        model.generate(ids, mask, max_length=N_CTX + 1)
    with pytest.raises(ValueError, match="context"):
        iv.generate(base, source_representations=vec(), max_new_tokens=N_CTX - 6)
    full = model.generate(ids, mask, max_length=N_CTX, max_new_tokens=N_CTX - 7)  # consistent and exactly full
    assert full.shape == (3, N_CTX)
    with pytest.raises(ValueError, match="conflicting"):
        model.generate(ids, mask, max_new_tokens=3, max_length=20)
    with pytest.raises(ValueError, match="conflicting"):
        iv.generate(base, source_representations=vec(), max_new_tokens=3, max_length=20)
    with pytest.raises(ValueError, match="max_new_tokens or max_length"):
        model.generate(ids, mask)
    with pytest.raises(ValueError, match="nothing to generate"):
        model.generate(ids, mask, max_length=7)  # max_length counts the prompt
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, mask, max_new_tokens=2, do_sample=True, temperature=0.0)
    assert not model.has_hooks()


@pytest.mark.parametrize("on_prompt", [True, False])
def test_unit_locations_past_the_prompt(model, on_prompt):
    """Position 9 does not exist in a 7-token prompt: a clear error whatever intervene_on_prompt says (with
    intervene_on_prompt=False the locations would otherwise be silently ignored)."""
    ids, mask = left_padded()
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    with pytest.raises(ValueError, match="position 9 is past the 7-token prompt"):
        iv.generate({"input_ids": ids, "attention_mask": mask}, unit_locations={"base": 9},
                    intervene_on_prompt=on_prompt, source_representations=vec(), max_new_tokens=3)
    assert not model.has_hooks()


def test_unit_locations_that_no_pass_uses_are_an_error(model):
    """pyvene's idiom `intervene_on_prompt=False, unit_locations={"base": 0}` means "every decode step at
    position 0" there; in hookvene it would intervene nowhere (unit_locations turn intervene_on_generated off and
    intervene_on_prompt=False turns the prompt pass off). A silent no-op must be an error."""
    ids, mask = left_padded()
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    with pytest.raises(ValueError, match="intervene_on_prompt=False and intervene_on_generated=False: nothing would"):
        iv.generate({"input_ids": ids, "attention_mask": mask}, unit_locations={"base": 0},
                    intervene_on_prompt=False, source_representations=vec(), max_new_tokens=3)


def test_interchange_needs_prompt_only_semantics(model):
    ids, mask = left_padded()
    src = ids.flip(0)
    iv = pv.IntervenableModel([{"layer": 0, "component": "mlp_output",
                                "intervention_type": pv.VanillaIntervention}], model)
    with pytest.raises(ValueError, match="source run"):
        iv.generate({"input_ids": ids, "attention_mask": mask}, sources=[{"input_ids": src}], max_new_tokens=3)
    # prompt-only interchange at named positions works and equals a manual recomputation
    _, out = iv.generate({"input_ids": ids, "attention_mask": mask}, sources=[{"input_ids": src}],
                         unit_locations={"sources->base": 6}, max_new_tokens=3)
    with torch.no_grad():
        _, cache = model.run_with_cache(src, names_filter="blocks.0.hook_mlp_out")
    donor = cache["blocks.0.hook_mlp_out"][:, 6]

    def patch(x, hook):
        x = x.clone()
        x[:, 6] = donor
        return x

    cur = ids
    cur_mask = mask
    with torch.no_grad():
        for _ in range(3):
            pos = (cur_mask.cumsum(-1) - 1).clamp(min=0)
            nxt = model.run_with_hooks(cur, attention_mask=cur_mask, position_ids=pos,
                                       fwd_hooks=[("blocks.0.hook_mlp_out", patch)]).logits[:, -1].argmax(-1)
            cur = torch.cat([cur, nxt[:, None]], 1)
            cur_mask = torch.cat([cur_mask, torch.ones_like(cur_mask[:, :1])], 1)
    assert_same(out, cur)
    assert not model.has_hooks()


def test_non_generative_models_are_refused(pairs):
    from hookvene.models.gru import GRULM, GRUConfig

    hf, _ = pairs["gpt2"]
    ids = torch.randint(1, VOCAB, (1, 4))
    base = pv.from_pretrained(hf, lm_head=False)  # GPT2 without its LM head
    with pytest.raises(ValueError, match="cannot generate"):
        base.generate(ids, max_new_tokens=2)
    iv = pv.IntervenableModel(steering_config(2), base)
    with pytest.raises(ValueError, match="cannot generate"):
        iv.generate({"input_ids": ids}, source_representations=vec(), max_new_tokens=2)
    assert not base.has_hooks()
    gru = GRULM(GRUConfig(include_emb=True, vocab_size=VOCAB, h_dim=8, n_layer=1)).eval()
    with pytest.raises(ValueError, match="cannot generate"):
        gru.generate(ids, max_new_tokens=2)


def test_hooks_removed_after_intervention_errors(model):
    ids, mask = left_padded()
    base = {"input_ids": ids, "attention_mask": mask}
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    with pytest.raises(ValueError, match="width"):  # raised inside the first hook call
        iv.generate(base, source_representations=torch.randn(D + 1), max_new_tokens=3)
    assert not model.has_hooks()
    passes = []

    def fails_later(b, s=None):
        passes.append(b.shape[1])
        if len(passes) == 3:
            raise RuntimeError("failed on a decode pass")
        return b

    lam = pv.IntervenableModel([{"layer": 0, "component": "mlp_output", "intervention": fails_later}], model)
    with pytest.raises(RuntimeError, match="decode pass"):
        lam.generate(base, max_new_tokens=NEW)
    assert passes == [7, 1, 1]
    assert not model.has_hooks()
    iv.generate(base, source_representations=vec(), max_new_tokens=2)  # still usable
    assert not model.has_hooks()


# --- T5 (decoder side) ----------------------------------------------------------------------------------------------


def test_t5_cache_equals_no_cache_and_transformers(t5_pair):
    hf, t5 = t5_pair
    ids, mask = left_padded(vocab=61)
    out, scores = t5.generate(ids, mask, max_new_tokens=NEW, output_scores=True)
    nocache, nocache_scores = t5.generate(ids, mask, max_new_tokens=NEW, output_scores=True, use_cache=False)
    assert out.shape == (3, 1 + NEW)  # decoder ids: the start token, then the new ones
    assert_same(out, nocache, scores, nocache_scores)
    assert_same(out, *manual_greedy_t5(t5, ids, mask, NEW)[:1])
    theirs = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                         output_logits=True, return_dict_in_generate=True)
    assert_same(out, theirs.sequences, scores, torch.stack(theirs.logits, dim=1))


def test_t5_max_length_counts_decoder_tokens_like_transformers(t5_pair):
    """transformers' max_length for an encoder-decoder counts the decoder sequence including its start token."""
    hf, t5 = t5_pair
    ids, mask = left_padded(vocab=61)
    theirs = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_length=5, min_length=5)
    ours = t5.generate(ids, mask, max_length=5)
    assert_same(ours, theirs)


def test_t5_batched_equals_per_example(t5_pair):
    _, t5 = t5_pair
    ids, mask = left_padded(vocab=61)
    batch, batch_scores = t5.generate(ids, mask, max_new_tokens=NEW, output_scores=True)
    for row, pad in enumerate((0, 2, 4)):
        one, one_scores = t5.generate(ids[row:row + 1, pad:], max_new_tokens=NEW, output_scores=True)
        assert_same(batch[row:row + 1], one, batch_scores[row:row + 1], one_scores)


def test_t5_decoder_steering_equals_manual(t5_pair):
    """Steering on the decoder's MLP outputs (named by hook) at every step; T5's hooks fire on every pass."""
    _, t5 = t5_pair
    ids, mask = left_padded(vocab=61)
    names = mlp_out_names(t5, "decoder.")
    v = vec(scale=3.0)
    iv = pv.IntervenableModel([{"layer": 0, "component": n, "intervention_type": pv.AdditionIntervention}
                               for n in names], t5)
    _, (out, scores) = iv.generate({"input_ids": ids, "attention_mask": mask}, source_representations=v,
                                   max_new_tokens=NEW, output_scores=True)
    ref, ref_scores = manual_greedy_t5(t5, ids, mask, NEW, names, v)
    assert_same(out, ref, scores, ref_scores)
    assert not torch.equal(out, t5.generate(ids, mask, max_new_tokens=NEW))
    seen = []
    with t5.hooks(fwd_hooks=[("decoder.blocks.0.hook_resid_pre", lambda x, h: seen.append(x.shape[1]))]):
        t5.generate(ids, mask, max_new_tokens=NEW)
    assert seen == [1] * NEW
    assert not t5.has_hooks()


def test_t5_decoder_component_names(t5_pair):
    """pyvene-style component names for T5's decoder ("decoder.mlp_output") steer the same as the hook names."""
    _, t5 = t5_pair
    ids, mask = left_padded(vocab=61)
    v = vec(scale=3.0)
    iv = pv.IntervenableModel(steering_config(t5.cfg.n_decoder_layers, "decoder.mlp_output"), t5)
    _, out = iv.generate({"input_ids": ids, "attention_mask": mask}, source_representations=v, max_new_tokens=NEW)
    assert_same(out, manual_greedy_t5(t5, ids, mask, NEW, mlp_out_names(t5, "decoder."), v)[0])


def test_t5_base_model_is_refused(t5_pair):
    hf, _ = t5_pair
    from transformers import T5Model

    base = pv.from_pretrained(T5Model(hf.config).eval())
    with pytest.raises(ValueError, match="cannot generate"):
        base.generate(torch.randint(2, 61, (1, 4)), max_new_tokens=2)


# --- ports: the spec's "LMs Generation" cell and Tutorial 6 ---------------------------------------------------------


def test_spec_lms_generation_cell(tmp_path, tokenizer):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    # a TinyStories stand-in: the cell reads token 14628 and generates up to 256 tokens
    torch.manual_seed(0)
    hf = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=14700, max_position_embeddings=256, hidden_size=16, num_layers=2,
                                        num_heads=2, intermediate_size=32, attention_types=[[["global", "local"], 1]],
                                        window_size=16, bos_token_id=0, eos_token_id=0)).eval()
    path = save_checkpoint(hf, tokenizer, str(tmp_path / "tinystories"))

    # --- the cell, with the checkpoint path instead of the hub name ---
    _, tokenizer, tinystory = pv.create_gpt_neo(path)
    emb_happy = tinystory.transformer.wte(
        torch.tensor(14628))

    pv_tinystory = pv.IntervenableModel([{
        "layer": l,
        "component": "mlp_output",
        "intervention_type": pv.AdditionIntervention
        } for l in range(tinystory.config.num_layers)],
        model=tinystory
    )
    # prompt and generate
    prompt = tokenizer(
        "Once upon a time there was", return_tensors="pt")
    _, intervened_story = pv_tinystory.generate(
        tokenizer("Once upon a time there was", return_tensors="pt"),
        source_representations=emb_happy*0.3, max_length=256
    )

    text = tokenizer.decode(
        intervened_story[0],
        skip_special_tokens=True
    )
    # --- end of the cell ---
    n = prompt["input_ids"].shape[1]
    assert intervened_story.shape == (1, 256)
    assert torch.equal(intervened_story[:, :n], prompt["input_ids"])
    assert text.startswith("Once upon a time there was")
    # greedy decoding is prefix-consistent: the first 16 new tokens of the plain story suffice to compare
    plain = tinystory.generate(prompt["input_ids"], prompt["attention_mask"], max_new_tokens=16)
    assert not torch.equal(intervened_story[:, :n + 16], plain)
    assert not tinystory.has_hooks()


def test_tutorial6_steering_generation(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a local stand-in for "gpt2": layer 6 must exist; a larger init so that the happy-sad direction matters
    hf = tiny_gpt2(tokenizer, n_embd=64, n_layer=8, n_head=4, initializer_range=0.2)
    path = save_checkpoint(hf, tokenizer, str(tmp_path / "gpt2"))
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token

    # 1. Get steering direction (happy vs sad)
    happy_inputs = tokenizer("I am very happy and", return_tensors="pt")
    sad_inputs = tokenizer("I am very sad and", return_tensors="pt")
    config = pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(layer=6, component="mlp_output", intervention_type=pv.CollectIntervention)])
    collector = pv.IntervenableModel(config, model)
    # the tutorial is "simplified": it writes `_, happy_acts = collector(...)` and `happy_acts[0].mean(dim=1)`.
    # As in pyvene, a Collect returns ((original, collected activations), output), and the activations are one
    # (pos, d) tensor per example, so the mean over positions is dim 0
    (_, happy_acts), _ = collector(base=happy_inputs)
    (_, sad_acts), _ = collector(base=sad_inputs)
    assert happy_acts[0].shape == (happy_inputs["input_ids"].shape[1], 64)
    steering_direction = happy_acts[0].mean(dim=0) - sad_acts[0].mean(dim=0)

    # 2. Config for steering during generation
    config = pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(layer=6, component="mlp_output", intervention_type=pv.AdditionIntervention)])
    intervenable = pv.IntervenableModel(config, model)

    # 3. Generate with steering
    inputs = tokenizer("Today I feel", return_tensors="pt")
    # the tutorial's call gives no source: as in pyvene, the Addition is then skipped (same tokens as no intervention)
    _, skipped = intervenable.generate(inputs, max_new_tokens=20, do_sample=True, temperature=0.7, seed=0)
    unsteered = intervenable.model.generate(inputs["input_ids"], max_new_tokens=20, do_sample=True, temperature=0.7,
                                            seed=0)
    assert torch.equal(skipped, unsteered)
    assert not intervenable.model.has_hooks()
    plain, output = intervenable.generate(inputs, source_representations=steering_direction, max_new_tokens=20,
                                          do_sample=True, temperature=0.7, seed=0, output_original_output=True)
    n = inputs["input_ids"].shape[1]
    assert output.shape == plain.shape == (1, n + 20)
    assert torch.equal(plain, intervenable.model.generate(inputs["input_ids"], max_new_tokens=20, do_sample=True,
                                                          temperature=0.7, seed=0))
    assert not torch.equal(output, plain)  # steering changes the sampled text (same seed)
    assert tokenizer.decode(output[0]).startswith("Today I feel")
    # the hookvene model shares the transformers model's weights
    assert intervenable.model.embed.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
