"""The hook API (hookvene/hooks.py) on a tiny hookvene GPT-2 built directly from its config (no transformers).

Every test ends with a check (the `model` fixture) that no hook is left attached, whatever the test did.
"""

import pytest
import torch

from hookvene import GPT2LM, ActivationCache, GPT2Config, HookPoint, act_name
from tests.helpers import ungated_hooks

D_VOCAB, N_CTX = 23, 12


@pytest.fixture(scope="module")
def _model():
    torch.manual_seed(0)
    return GPT2LM(GPT2Config(d_vocab=D_VOCAB, n_ctx=N_CTX, d_model=16, n_layers=2, n_heads=2, d_mlp=24)).eval()


@pytest.fixture
def model(_model):
    assert not _model.has_hooks()
    yield _model
    leftover = [n for n, p in _model.hook_dict.items() if p.has_hooks]
    _model.reset_hooks()
    _model.zero_grad(set_to_none=True)
    assert not leftover, f"hooks left attached after the test: {leftover}"


@pytest.fixture
def tokens():
    return torch.randint(0, D_VOCAB, (2, 7))


def noop(t, hook):
    return None


# --- HookPoint -----------------------------------------------------------------------------------------------


def test_hookpoint_is_identity_with_nothing_attached():
    hp = HookPoint()
    x = torch.randn(3, 4)
    assert hp(x) is x
    assert not hp.has_hooks
    hp.fwd_fns.append(noop)  # a function returning None leaves the tensor alone
    assert hp(x) is x


def test_hookpoint_names_and_layer(model):
    hd = model.hook_dict
    assert hd["blocks.1.attn.hook_pattern"].name == "blocks.1.attn.hook_pattern"
    assert hd["blocks.1.attn.hook_pattern"].layer() == 1
    assert hd["hook_embed"].layer() is None


def test_noop_hooks_do_not_change_the_output(model, tokens):
    with torch.no_grad():
        ref = model(tokens).logits
        out = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, noop)]).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --- add_hook ------------------------------------------------------------------------------------------------


def test_add_hook_by_name_list_and_predicate(model, tokens):
    seen = []

    def record(t, hook):
        seen.append(hook.name)

    handles = model.add_hook("blocks.0.hook_resid_pre", record)
    handles += model.add_hook(["blocks.1.hook_mlp_out", "hook_logits"], record)
    handles += model.add_hook(lambda n: n.endswith("hook_z"), record)
    assert len(handles) == 5
    with torch.no_grad():
        model(tokens)
    assert seen == ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.1.attn.hook_z",
                    "blocks.1.hook_mlp_out", "hook_logits"]
    for h in handles:
        h.remove()
    assert not model.has_hooks()


def test_add_hook_rejects_bad_direction(model):
    with pytest.raises(ValueError, match="dir must be 'fwd' or 'bwd', got 'sideways'"):
        model.add_hook("hook_embed", noop, dir="sideways")
    assert not model.has_hooks()


def test_replacing_hook_changes_the_output(model, tokens):
    with torch.no_grad():
        ref = model(tokens).logits
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[("hook_logits", lambda t, h: torch.zeros_like(t))]).logits
        assert torch.count_nonzero(zeroed) == 0
        ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", lambda t, h: t * 0)]).logits
        assert (ablated - ref).abs().max() > 1e-3
        # the replacement is what flows on: zero-ablating the last MLP == removing its term from the residual
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_mid"])
        expected = model.unembed(model.ln_final(cache["blocks.1.hook_resid_mid"]))
    torch.testing.assert_close(ablated, expected, atol=1e-5, rtol=1e-5)


def test_handle_removes_exactly_its_function(model):
    point = model.hook_dict["hook_embed"]

    def f(t, h):
        return None

    h1 = model.add_hook("hook_embed", f)[0]
    model.add_hook("hook_embed", f)
    h1.remove()
    assert point.fwd_fns == [f]
    h1.remove()  # removing twice removes the other copy, never more than one
    assert point.fwd_fns == []


# --- hooks() context manager, run_with_hooks, reset_hooks ------------------------------------------------------


def test_hooks_context_removes_only_what_it_added(model, tokens):
    point = model.hook_dict["blocks.0.hook_attn_out"]

    def user(t, h):
        return None

    def outer(t, h):
        return None

    def inner(t, h):
        return None

    model.add_hook("blocks.0.hook_attn_out", user)
    with model.hooks([("blocks.0.hook_attn_out", outer)]) as m:
        assert m is model
        assert point.fwd_fns == [user, outer]
        with model.hooks([("blocks.0.hook_attn_out", inner), ("blocks.0.hook_attn_out", user)],
                         bwd_hooks=[("blocks.0.hook_attn_out", inner)]):
            assert point.fwd_fns == [user, outer, inner, user]
            assert point.bwd_fns == [inner]
        assert point.fwd_fns == [user, outer] and point.bwd_fns == []
    assert point.fwd_fns == [user]
    model.reset_hooks()
    assert not model.has_hooks()


def test_hooks_are_removed_when_a_hook_raises(model, tokens):
    def user(t, h):
        return None

    def boom(t, h):
        raise RuntimeError("boom")

    model.add_hook("hook_embed", user)
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks([("blocks.1.hook_resid_post", boom), ("hook_logits", noop)]):
            model(tokens)
    assert model.hook_dict["hook_embed"].fwd_fns == [user]
    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", boom)])
    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(tokens, bwd_hooks=[("hook_logits", noop)], fwd_hooks=[("blocks.1.mlp.hook_post", boom)])
    assert [n for n, p in model.hook_dict.items() if p.has_hooks] == ["hook_embed"]
    # a user's raising hook stays (the user added it); run_with_cache's own hooks go
    model.add_hook("blocks.1.mlp.hook_post", boom)
    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_cache(tokens, incl_bwd=True, labels=tokens)
    assert {n: (p.fwd_fns, p.bwd_fns) for n, p in model.hook_dict.items() if p.has_hooks} == {
        "hook_embed": ([user], []), "blocks.1.mlp.hook_post": ([boom], [])}
    model.reset_hooks()


def test_hooks_context_with_an_unknown_name_attaches_nothing(model):
    with pytest.raises(ValueError, match="hook_resid_pre"):
        with model.hooks([("hook_embed", noop), ("blocks.0.hook_resid_pr", noop)]):
            pass
    assert not model.has_hooks()
    with pytest.raises(ValueError, match=r"unknown hook point 'blocks\.0\.hook_resid_pr'\. Did you mean"):
        model.add_hook(["hook_embed", "blocks.0.hook_resid_pr"], noop)
    assert not model.has_hooks()  # the list was checked before anything was attached


def test_run_with_hooks(model, tokens):
    calls = []
    out = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda t, h: calls.append(h.name))],
                               attention_mask=torch.ones_like(tokens))
    assert calls == ["blocks.0.hook_resid_post"] and out.logits.shape == (2, 7, D_VOCAB)
    assert not model.has_hooks()


def test_reset_hooks(model):
    model.add_hook(lambda n: True, noop)
    model.add_hook(lambda n: "attn" in n, noop, dir="bwd")
    assert model.has_hooks()
    model.reset_hooks()
    assert not model.has_hooks()
    assert all(not p.fwd_fns and not p.bwd_fns for p in model.hook_dict.values())


# --- unknown names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, good", [("blocks.0.attn.hook_patern", "blocks.0.attn.hook_pattern"),
                                       ("blocks.1.hook_resid_psot", "blocks.1.hook_resid_post"),
                                       ("blocks.0.mlp.hook_pos", "blocks.0.mlp.hook_post")])
def test_unknown_name_suggests_close_matches(model, tokens, bad, good):
    with pytest.raises(ValueError, match=f"Did you mean.*'{good}'"):
        model.add_hook(bad, noop)
    with pytest.raises(ValueError, match=f"Did you mean.*'{good}'"):
        model.run_with_cache(tokens, names_filter=[bad])
    with pytest.raises(ValueError, match=f"Did you mean.*'{good}'"):
        model.run_with_cache(tokens, names_filter=bad)
    with pytest.raises(ValueError, match="unknown hook point"):
        model.run_with_hooks(tokens, fwd_hooks=[(bad, noop)])
    assert not model.has_hooks()


# --- run_with_cache -------------------------------------------------------------------------------------------


def test_run_with_cache_filter_forms(model, tokens):
    all_names = ungated_hooks(model)
    with torch.no_grad():
        ref = model(tokens).logits
        out, cache = model.run_with_cache(tokens)
    assert set(cache) == set(all_names)  # None: everything
    order = list(cache)  # in the order the hooks fired
    assert order[:3] == ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"] and order[-1] == "hook_logits"
    assert order.index("blocks.0.attn.hook_pattern") < order.index("blocks.0.attn.hook_z")
    assert isinstance(cache, ActivationCache)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache["hook_logits"], ref, atol=1e-5, rtol=1e-5)

    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    assert set(cache) == {"blocks.1.attn.hook_pattern"}
    names = ["blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    assert set(cache) == set(names)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_v"))
    assert set(cache) == {"blocks.0.attn.hook_v", "blocks.1.attn.hook_v"}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: False)
    assert len(cache) == 0
    assert not model.has_hooks()


def test_cached_tensors_are_detached_and_moved(model, tokens):
    out, cache = model.run_with_cache(tokens)  # grad mode on: the output keeps its graph, the cache does not
    assert out.logits.requires_grad
    assert all(not t.requires_grad and t.grad_fn is None for t in cache.values())
    _, moved = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post", device="meta")
    assert moved["blocks.0.hook_resid_post"].device.type == "meta"
    _, same = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post", device="cpu")
    torch.testing.assert_close(same["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"])
    _, on_cpu = model.run_with_cache(tokens, names_filter="hook_embed", device=torch.device("cpu"))
    assert on_cpu["hook_embed"].device == torch.device("cpu")


def test_activation_cache_shorthand(model, tokens):
    _, cache = model.run_with_cache(tokens)
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["resid_post", 1] is cache["blocks.1.hook_resid_post"]
    assert cache["z", 1] is cache["blocks.1.attn.hook_z"]
    assert act_name("pattern", 3) == "blocks.3.attn.hook_pattern"
    assert act_name("hook_embed") == "hook_embed"
    with pytest.raises((KeyError, ValueError), match="blocks.0.attn.hook_pattern"):
        cache["blocks.0.attn.hook_patern"]
    with pytest.raises((KeyError, ValueError), match=r"unknown cached activation 'blocks\.7\.attn\.hook_pattern'"):
        cache["pattern", 7]
    torch.testing.assert_close(cache["pattern", 0].sum(-1), torch.ones(2, 2, 7))


# --- backward hooks -------------------------------------------------------------------------------------------

GRAD_NAMES = [
    "hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_normalized",
    "blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.attn.hook_attn_scores",
    "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.0.hook_attn_out", "blocks.0.hook_resid_post",
    "blocks.1.hook_resid_pre", "blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post",
    "ln_final.hook_normalized", "hook_logits",
]


def reference_grads(model, tokens, names, loss_fn):
    """Gradients of the loss with respect to each named activation, from torch.autograd.grad."""
    acts = {}

    def keep(t, hook):
        acts[hook.name] = t

    with model.hooks([(names, keep)]):
        out = model(tokens, labels=tokens)
    grads = torch.autograd.grad(loss_fn(out), [acts[n] for n in names])
    return dict(zip(names, grads))


def test_backward_hooks_match_autograd(model, tokens):
    def loss_fn(out):
        return out.logits.square().mean() + out.loss

    ref = reference_grads(model, tokens, GRAD_NAMES, loss_fn)
    got = {}

    def grab(g, hook):
        got[hook.name] = g.clone()

    retained = {}

    def retain(t, hook):
        t.retain_grad()
        retained[hook.name] = t

    # bwd hooks on the hook points whose attention path is fused when no one watches scores/pattern: the
    # gradient must be the same either way
    out = model.run_with_hooks(tokens, labels=tokens, bwd_hooks=[(GRAD_NAMES, grab)],
                               fwd_hooks=[(["blocks.1.hook_mlp_out", "blocks.1.attn.hook_z"], retain)])
    assert not model.has_hooks()
    loss_fn(out).backward()  # backward hooks captured at forward time fire after the context closed
    assert set(got) == set(GRAD_NAMES)
    for n in GRAD_NAMES:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)
    ref2 = reference_grads(model, tokens, list(retained), loss_fn)
    for n, t in retained.items():
        torch.testing.assert_close(t.grad, ref2[n], atol=1e-6, rtol=1e-5, msg=n)


def test_backward_hook_can_replace_the_gradient(model, tokens):
    out = model.run_with_hooks(tokens, labels=tokens,
                               bwd_hooks=[("blocks.0.hook_resid_pre", lambda g, h: torch.zeros_like(g))])
    out.loss.backward()
    # the residual stream carries all gradient to the embeddings; the unembedding is tied, so only the
    # position embedding is sure to get nothing
    assert torch.count_nonzero(model.pos_embed.weight.grad) == 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_incl_bwd_gives_autograd_gradients(model, tokens):
    ref = reference_grads(model, tokens, ungated_hooks(model), lambda out: out.loss)
    out, cache = model.run_with_cache(tokens, labels=tokens, incl_bwd=True)
    assert not model.has_hooks()
    assert set(cache) == set(ungated_hooks(model)) | {n + "_grad" for n in ungated_hooks(model)}
    for n in ungated_hooks(model):
        torch.testing.assert_close(cache[n + "_grad"], ref[n], atol=1e-6, rtol=1e-5, msg=n)
        assert cache[n + "_grad"].shape == cache[n].shape
    _, cache = model.run_with_cache(tokens, labels=tokens, incl_bwd=True, names_filter="blocks.1.attn.hook_pattern")
    assert set(cache) == {"blocks.1.attn.hook_pattern", "blocks.1.attn.hook_pattern_grad"}
    torch.testing.assert_close(cache["blocks.1.attn.hook_pattern_grad"], ref["blocks.1.attn.hook_pattern"],
                               atol=1e-6, rtol=1e-5)


def test_incl_bwd_without_a_scalar_raises(model, tokens):
    with pytest.raises(ValueError, match="labels"):
        model.run_with_cache(tokens, incl_bwd=True)
    assert not model.has_hooks()


def test_failed_calls_leave_no_hooks(model, tokens):
    with pytest.raises(ValueError, match="vocabulary"):
        model.run_with_cache(tokens + D_VOCAB)
    with pytest.raises(ValueError, match="n_ctx"):
        model.run_with_cache(torch.zeros(1, N_CTX + 1, dtype=torch.long), incl_bwd=True, labels=None)
    with pytest.raises(ValueError, match="vocabulary"):
        model.run_with_hooks(tokens - 1, fwd_hooks=[("hook_embed", noop)], bwd_hooks=[("hook_logits", noop)])
    assert not model.has_hooks()
