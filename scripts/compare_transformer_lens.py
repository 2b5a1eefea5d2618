"""Compare hookvene's TransformerLens toolkit with TransformerLens itself on the same weights (not run in CI).

Builds tiny random GPT-2 and GPT-Neo checkpoints locally (nothing is downloaded), loads each into hookvene and into
TL's HookedTransformer (TL's own weight conversion), unprocessed and with TL's default weight processing (fold_ln,
center_writing_weights, center_unembed, fold_value_biases), and prints the largest absolute difference of: every
hook both models have, the logits, the weight views, and the cache decompositions. Run it in a separate
environment that has TransformerLens (it is not a hookvene dependency):

    python3.11 -m venv /tmp/tlenv && /tmp/tlenv/bin/pip install torch transformer-lens==3.5.1
    /tmp/tlenv/bin/python scripts/compare_transformer_lens.py
"""

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hookvene as pv  # noqa: E402
from tests.helpers import make_tokenizer, save_checkpoint  # noqa: E402

PROCESS = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
NO_PROCESS = {k: False for k in PROCESS}


def hf_models(tok):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=3, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()
    neo = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=len(tok), hidden_size=64, num_layers=4, num_heads=4,
                                         attention_types=[[["global", "local"], 2]], window_size=5,
                                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0)).eval()
    for hf in (gpt2, neo):  # LayerNorms away from (1, 0), so that folding them is really compared
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "ln" in name:
                    p.add_(torch.randn_like(p) * 0.3)
    return {"GPT-2": gpt2, "GPT-Neo": neo}


def tl_model(hf, tok, processing):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_neo_weights

    c = hf.config
    neo = c.model_type == "gpt_neo"
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        d_head=c.hidden_size // c.num_attention_heads, d_mlp=4 * c.hidden_size, n_ctx=c.max_position_embeddings,
        d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN", eps=c.layer_norm_epsilon,
        use_attn_scale=not neo, use_local_attn=neo, attn_types=c.attention_layers if neo else None,
        window_size=c.window_size if neo else None, default_prepend_bos=True, positional_embedding_type="standard",
        original_architecture="GPTNeoForCausalLM" if neo else "GPT2LMHeadModel")
    model = HookedTransformer(cfg, tokenizer=tok)
    state = (convert_neo_weights if neo else convert_gpt2_weights)(hf, cfg)
    model.load_and_process_state_dict(state, **processing, refactor_factored_attn_matrices=False)
    return model.eval()


def maxdiff(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    masked = (a < -1e30) & (b < -1e30)  # masked attention scores: -inf in TL, the dtype's minimum here
    return float((a - b).masked_fill(masked, 0).abs().max())


def compare(name, hf, tok, path, processing):
    from transformers import AutoTokenizer

    ours = pv.from_pretrained(path, **processing)
    tl = tl_model(hf, AutoTokenizer.from_pretrained(path), processing)  # TL re-loads its tokenizer by name
    ours.set_use_attn_result(True)
    tl.set_use_attn_result(True)
    prompts = ["When John and Mary went to the shops, Mary gave the book to",
               "The capital of Spain is Madrid. The capital of Italy is"]
    rows = []
    with torch.no_grad():
        tokens = tl.to_tokens(prompts, padding_side="left")
        rows.append(("to_tokens (left padded) equal", float(not torch.equal(tokens, ours.to_tokens(prompts,
                                                                                                    padding_side="left")))))
        real = ours.tokens_and_mask(prompts, padding_side="left")[1].bool()
        padded = maxdiff(ours(prompts, padding_side="left", return_type="logits")[real],
                         tl(prompts, padding_side="left", return_type="logits")[real])
        rows.append(("logits of a left-padded batch (real positions)", padded))
        a_logits, a = ours.run_with_cache(prompts[0], return_type="logits")
        b_logits, b = tl.run_with_cache(prompts[0], return_type="logits")
        rows.append(("logits", maxdiff(a_logits, b_logits)))
        shared = sorted(set(a) & set(b))
        # TL's hook_normalized is before the LayerNorm's affine map, ours after: equal once fold_ln sets it to 1, 0
        compared = [n for n in shared if processing["fold_ln"] or not n.endswith("hook_normalized")]
        worst = max(compared, key=lambda n: maxdiff(a[n], b[n]))
        rows.append((f"{len(compared)} shared hooks (worst {worst})", maxdiff(a[worst], b[worst])))
        rows.append(("loss", maxdiff(ours(prompts[0], return_type="loss"), tl(prompts[0], return_type="loss"))))
        for w in ("W_E", "W_pos", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in",
                  "W_out", "b_in", "b_out"):
            rows.append((f"weight view {w}", maxdiff(getattr(ours, w), getattr(tl, w))))
        rows.append(("QK.AB, OV.AB", max(maxdiff(ours.QK.AB, tl.QK.AB), maxdiff(ours.OV.AB, tl.OV.AB))))
        rows.append(("OV.svd() S, OV.norm()", max(maxdiff(ours.OV.S, tl.OV.S), maxdiff(ours.OV.norm(), tl.OV.norm()))))
        rows.append(("all_composition_scores Q, K, V", max(maxdiff(ours.all_composition_scores(m),
                                                                   tl.all_composition_scores(m)) for m in "QKV")))
        for method, kw in (("accumulated_resid", dict(apply_ln=True, incl_mid=True)),
                           ("decompose_resid", dict(apply_ln=True)), ("decompose_resid", dict(layer=2, mlp_input=True)),
                           ("stack_head_results", dict(apply_ln=True, pos_slice=-1)),
                           ("stack_neuron_results", dict(layer=2, pos_slice=-1)),
                           ("get_full_resid_decomposition", dict(expand_neurons=False))):
            x, la = getattr(a, method)(**kw, return_labels=True)
            y, lb = getattr(b, method)(**kw, return_labels=True)
            rows.append((f"{method}({', '.join(f'{k}={v}' for k, v in kw.items())})",
                         maxdiff(x, y) if la == lb else float("inf")))
        answer = tl.to_single_token(" Mary")
        stack = a.decompose_resid(pos_slice=-1)
        rows.append(("logit_attrs", maxdiff(a.logit_attrs(stack, answer, pos_slice=-1),
                                            b.logit_attrs(b.decompose_resid(pos_slice=-1), answer, pos_slice=-1))))
        rows.append(("tokens_to_residual_directions", maxdiff(ours.tokens_to_residual_directions(" Mary"),
                                                              tl.tokens_to_residual_directions(" Mary"))))
        rows.append(("to_str_tokens equal", float(ours.to_str_tokens(prompts[0]) != tl.to_str_tokens(prompts[0]))))
    if not processing["fold_ln"]:  # the sweeps are the same maths on processed weights; once per model is enough
        rows += compare_patching(ours, tl)
    mode = "processed" if processing["fold_ln"] else "unprocessed"
    return [(name, mode, check, value) for check, value in rows]


def compare_patching(ours, tl) -> list[tuple[str, float]]:
    """hookvene's sweeps, given TL's kind of metric (logits -> one number), against `transformer_lens.patching`."""
    from transformer_lens import patching

    from hookvene.experiments import activation_patch

    clean = ["When John and Mary went to the shops, Mary gave the book to",
             "When Mary and John went to the shops, John gave the book to"]
    corrupted = [clean[1], clean[0]]  # the other subject: the answers swap
    john, mary = tl.to_single_token(" John"), tl.to_single_token(" Mary")
    answers = torch.tensor([[john, mary], [mary, john]])

    def metric(logits):  # TL's convention: the mean logit difference over the batch, one number
        last = logits[:, -1]
        return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()

    clean_tokens, corrupted_tokens = tl.to_tokens(clean), tl.to_tokens(corrupted)
    _, clean_cache = tl.run_with_cache(clean_tokens)
    L, H = tl.cfg.n_layers, tl.cfg.n_heads
    rows = []
    for kind, tl_fn, by_pos in (("resid_pre", patching.get_act_patch_resid_pre, False),
                                ("heads", patching.get_act_patch_attn_head_out_all_pos, False),
                                ("heads_q", patching.get_act_patch_attn_head_q_all_pos, False),
                                ("heads_k", patching.get_act_patch_attn_head_k_all_pos, False),
                                ("heads_v", patching.get_act_patch_attn_head_v_all_pos, False),
                                ("heads_k_pos", patching.get_act_patch_attn_head_k_by_pos, True)):
        want = tl_fn(tl, corrupted_tokens, clean_cache, metric)  # (layer, head) / (layer, pos) / (layer, pos, head)
        got = activation_patch(ours, clean_tokens, corrupted_tokens, metric, kind=kind).values
        if by_pos:
            got = got.view(L, H, -1).permute(0, 2, 1)  # rows L{l}H{h}, columns positions -> TL's (layer, pos, head)
        rows.append((f"activation_patch kind={kind}, TL-style metric (vs transformer_lens.patching)",
                     maxdiff(got, want) if got.shape == want.shape else float("inf")))
    return rows


def main() -> None:
    from importlib.metadata import version

    import transformer_lens  # noqa: F401 (fail early with a clear message when TL is missing)

    tok = make_tokenizer()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, hf in hf_models(tok).items():
            path = save_checkpoint(hf, tok, os.path.join(tmp, name))
            for processing in (NO_PROCESS, PROCESS):
                results += compare(name, hf, tok, path, processing)
    print(f"hookvene vs TransformerLens {version('transformer-lens')} (max |difference|, float32, same weights)\n")
    print("| model | weights | check | max abs diff |\n|---|---|---|---|")
    for name, mode, check, value in results:
        print(f"| {name} | {mode} | {check} | {value:.1e} |")
    bad = [r for r in results if not r[3] <= 1e-4]
    print(f"\n{len(results) - len(bad)} of {len(results)} checks within 1e-4")
    if bad:
        print("over 1e-4:", bad)


if __name__ == "__main__":
    main()
