"""hookvene's SAEs against the `sae-lens` package (code we did not write), on the same weights.

Run it in an environment that has sae-lens (it is not a hookvene dependency), with hookvene importable:

    python3.11 -m venv /tmp/saeenv && /tmp/saeenv/bin/pip install torch==2.13.0 sae-lens
    PYTHONPATH=. /tmp/saeenv/bin/python scripts/compare_sae_lens.py

For each architecture and option set it
1. builds a random SAE in SAELens (every weight random, so each term of the maths shows), saves it with SAELens's
   `save_model`, loads the folder with `hookvene.SAE.load_from_disk`, and compares `encode`, `decode` and
   `forward` (with and without the error term) on random activations;
2. goes the other way: hookvene's `save_model` read by SAELens's `SAE.load_from_disk`;
3. splices both into the same random GPT-2 (SAELens's `HookedSAETransformer` on TransformerLens, hookvene's own
   model, weights converted from one `transformers` checkpoint) and compares logits and cached feature
   activations of `run_with_cache_with_saes`, and logits with the 10 most active features zeroed by a hook under
   the error term.
It prints a Markdown table (max abs differences) and exits non-zero if any exceeds 1e-5 (1e-4 for logits).
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sae_lens  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import hookvene as pv  # noqa: E402

D_MODEL, D_SAE, HOOK = 64, 256, "blocks.1.hook_resid_pre"
VARIANTS = [  # (architecture, SAELens config class, options)
    ("standard", sae_lens.StandardSAEConfig, {}),
    ("standard", sae_lens.StandardSAEConfig, {"apply_b_dec_to_input": False, "normalize_activations": "layer_norm"}),
    ("jumprelu", sae_lens.JumpReLUSAEConfig, {"apply_b_dec_to_input": False}),
    ("jumprelu", sae_lens.JumpReLUSAEConfig, {"normalize_activations": "constant_norm_rescale"}),
    ("topk", sae_lens.TopKSAEConfig, {"k": 12}),
    ("topk", sae_lens.TopKSAEConfig, {"k": 12, "rescale_acts_by_decoder_norm": True}),
]
CLASSES = {"standard": sae_lens.StandardSAE, "jumprelu": sae_lens.JumpReLUSAE, "topk": sae_lens.TopKSAE}


def random_sae_lens(arch: str, cfg_cls: type, options: dict, seed: int) -> "sae_lens.SAE":
    cfg = cfg_cls(d_in=D_MODEL, d_sae=D_SAE, **options)
    cfg.metadata.hook_name = HOOK
    sae = CLASSES[arch](cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W") else 0.2))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.3)
    return sae


def zero_features(acts: torch.Tensor, hook: object) -> torch.Tensor:
    """Zero the 10 features with the largest total activation (ones that fire, whatever the architecture)."""
    acts = acts.clone()
    acts[..., acts.flatten(0, -2).sum(0).topk(10).indices] = 0
    return acts


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def models() -> tuple["sae_lens.HookedSAETransformer", torch.nn.Module]:
    """One random GPT-2 as TransformerLens (under SAELens's HookedSAETransformer) and as hookvene."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=D_MODEL, n_layer=2, n_head=4, n_inner=4 * D_MODEL, vocab_size=100,
                                    n_positions=32)).eval()
    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_ctx=32, d_head=16, n_heads=4, d_mlp=4 * D_MODEL,
                                  d_vocab=100, act_fn="gelu_new", normalization_type="LN", eps=1e-5,
                                  original_architecture="GPT2LMHeadModel")
    tl = sae_lens.HookedSAETransformer(cfg)
    tl.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False)
    return tl.eval(), pv.from_pretrained(hf, copy=True).eval()


def main() -> int:
    rows, worst = [], {"maths": 0.0, "logits": 0.0}
    tl, hv_model = models()
    tokens = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_diff = max_diff(tl(tokens), hv_model(tokens).logits)
    x = torch.randn(4, 7, D_MODEL, generator=torch.Generator().manual_seed(2)) * 2
    for i, (arch, cfg_cls, options) in enumerate(VARIANTS):
        ref = random_sae_lens(arch, cfg_cls, options, seed=10 + i)
        with tempfile.TemporaryDirectory() as tmp:
            ref.save_model(tmp)
            ours = pv.SAE.load_from_disk(tmp)
        with tempfile.TemporaryDirectory() as tmp:  # the other direction
            ours.save_model(tmp)
            back = sae_lens.SAE.load_from_disk(tmp)
        with torch.no_grad():
            d = {"encode": max_diff(ref.encode(x), ours.encode(x))}
            acts = ref.encode(x)
            ours.encode(x)  # decode undoes the last encode's normalisation, in both libraries
            d["decode"] = max_diff(ref.decode(acts), ours.decode(acts))
            d["forward"] = max_diff(ref(x), ours(x))
            ref.use_error_term = ours.use_error_term = True
            d["forward, error term"] = max_diff(ref(x), ours(x))
            ref.use_error_term = ours.use_error_term = False
            d["hookvene file -> SAELens"] = max(max_diff(back.encode(x), ref.encode(x)), max_diff(back(x), ref(x)))
            spliced = {}
            for err in (False, True):
                out_tl, cache_tl = tl.run_with_cache_with_saes(tokens, saes=[ref], use_error_term=err)
                out_hv, cache_hv = hv_model.run_with_cache_with_saes(tokens, saes=[ours], use_error_term=err)
                spliced[err] = max_diff(out_tl, out_hv.logits)
                key = f"{HOOK}.hook_sae_acts_post"
                d["spliced feature acts"] = max(d.get("spliced feature acts", 0.0),
                                                max_diff(cache_tl[key], cache_hv[key]))
            hooks = [(f"{HOOK}.hook_sae_acts_post", zero_features)]  # an edit under the error term
            with tl.saes(saes=[ref], use_error_term=True):  # SAELens's run_with_hooks_with_saes takes no error term
                edited_tl = tl.run_with_hooks(tokens, fwd_hooks=hooks)
            edited_hv = hv_model.run_with_hooks_with_saes(tokens, saes=[ours], use_error_term=True, fwd_hooks=hooks)
            spliced["edited"] = max_diff(edited_tl, edited_hv.logits)
            assert max_diff(edited_hv.logits, out_hv.logits) > 1e-3  # the edit did change the output
        worst["maths"] = max(worst["maths"], *d.values())
        worst["logits"] = max(worst["logits"], *spliced.values())
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        rows.append(f"| {arch} ({opts}) | {d['encode']:.1e} | {d['decode']:.1e} | {d['forward']:.1e} | "
                    f"{d['forward, error term']:.1e} | {d['hookvene file -> SAELens']:.1e} | "
                    f"{d['spliced feature acts']:.1e} | {spliced[False]:.1e} / {spliced[True]:.1e} | "
                    f"{spliced['edited']:.1e} |")
    print(f"sae-lens {sae_lens.__version__}; the two GPT-2s (no SAE) differ by {base_diff:.1e} in logits\n")
    print("| SAE | encode | decode | forward | forward + error | hookvene file read by SAELens | spliced feature acts "
          "| spliced logits (recon / + error) | top 10 features zeroed, + error |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    ok = worst["maths"] <= 1e-5 and worst["logits"] <= 1e-4 and base_diff <= 1e-4
    print(f"\nmax abs difference: SAE maths {worst['maths']:.1e} (bound 1e-5), spliced logits {worst['logits']:.1e} "
          f"(bound 1e-4): {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
