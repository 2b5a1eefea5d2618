"""TransformerLens's `ActivationCache` analysis methods: the residual stream taken apart into what each component wrote.

`model.run_with_cache(...)` returns this class for every hookvene model. The methods read hook names
(`blocks.{l}.hook_attn_out`, ...), the model's config (`n_layers`, `n_heads`) and its weight views
(`blocks[l].attn.W_O`, `blocks[l].mlp.W_out`, `tokens_to_residual_directions`), so they work on the decoder-only
transformers (GPT-2, GPT-Neo, GPT-NeoX, Llama / Mistral / Qwen2) and, one stack at a time, on T5: every method takes
`stack="encoder"` or `stack="decoder"` there (and only there), e.g. `cache.decompose_resid(stack="decoder")`. The GRU
and the MLP classifier raise a ValueError saying so (no transformer to decompose). Semantics follow TransformerLens
3.x, names included:

    accumulated_resid   the residual stream entering each layer (the logit lens)
    decompose_resid     embeddings + each attention / MLP output: sums to the residual stream entering `layer`
    stack_head_results  each head's output in d_model (z @ W_O per head), labelled L{l}H{h}
    stack_neuron_results  each neuron's output (post activation x its row of W_out), labelled L{l}N{n}
    apply_ln_to_stack   what the final (or a block's) LayerNorm does to each component, with the *cached* scale
    logit_attrs         each component's direct contribution to a token's logit (or a logit difference)

As in TransformerLens, `apply_ln_to_stack` centres and divides by the LayerNorm scale but does not apply its weight
and bias: load with `fold_ln=True` (see `hookvene.from_pretrained`) for attributions that sum to the logits.

T5, per stack: a decoder block writes three times (self-attention `attn_out`, cross-attention `cross_attn_out`, MLP
`mlp_out`; residual states resid_pre, resid_mid, resid_mid_cross, resid_post), and all three are listed; cross-attention
heads are labelled `L{l}CH{h}` after the block's self-attention heads `L{l}H{h}`; `mlp_input` means the MLP's input
(ln3, after both attentions, in the decoder). T5's RMS norms have no hook_scale: their scale is computed from the cached
stream they read. `logit_attrs` is for the decoder only; as T5's weights cannot be processed, it folds the decoder's
final-norm weight and the output rescale (d_model**-0.5, original T5) into the token directions, so the attributions
of a decomposition sum to the logits.
"""

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hookvene.hooks import ActivationCache as BaseCache
from hookvene.hooks import act_name

PosSlice = None | int | slice | list[int] | Tensor


def slice_dim(x: Tensor, index: PosSlice, dim: int) -> Tensor:
    """`x` indexed along `dim` (None keeps everything; an int drops the dim, as TransformerLens's Slice does)."""
    if index is None:
        return x
    if isinstance(index, list):
        index = torch.tensor(index, device=x.device)
    return x[(slice(None),) * (dim % x.ndim) + (index,)]


STACKS = ("encoder", "decoder")


@dataclass(frozen=True)
class ResidStream:
    """One residual stream of the model that filled a cache: a decoder-only model's, or one stack of T5's."""

    prefix: str  # of its hook names: "" (decoder-only), "encoder." or "decoder."
    blocks: Any
    ln_final: Any
    n_layers: int
    n_heads: int
    attns: tuple[str, ...] = ("attn",)  # a block's attention modules, in the order they write: + "cross_attn"
    mlp_ln: str = "ln2"  # the norm reading the MLP's input (T5 decoder: ln3)

    def hook(self, layer: int, name: str) -> str:
        """The full name of block `layer`'s hook `name`: hook("resid_pre", 0), hook("attn.hook_z", 0) (a dot: as is)."""
        return f"{self.prefix}blocks.{layer}." + (name if "." in name else f"hook_{name}")

    @property
    def mids(self) -> tuple[str, ...]:
        """The residual states inside a block, in order: resid_mid (+ resid_mid_cross after cross-attention)."""
        return ("resid_mid", "resid_mid_cross")[:len(self.attns)]

    @property
    def attn_outs(self) -> tuple[str, ...]:
        return tuple(f"{a}_out" for a in self.attns)


class ActivationCache(BaseCache):
    """Activations by hook name, with TransformerLens's decompositions of the residual stream (module docstring)."""

    # -- what the methods need from the model ------------------------------------------------------------------
    def _unsupported(self) -> ValueError:
        name = type(self.model).__name__
        why = ("an encoder-decoder model with two residual streams: pass stack='encoder' or stack='decoder' to "
               "choose one, e.g. cache.decompose_resid(stack='decoder')"
               if getattr(self.model, "is_encoder_decoder", False) else
               "not a transformer: it has no attention heads, attention outputs or residual-stream blocks to "
               "decompose; read its hooks directly")
        return ValueError(f"this cache's analysis methods (accumulated_resid, decompose_resid, stack_head_results, "
                          f"stack_neuron_results, apply_ln_to_stack, logit_attrs, ...) need the decoder-only "
                          f"transformer that filled it (GPT-2, GPT-Neo, GPT-NeoX, Llama / Mistral / Qwen2), or "
                          f"one stack of an encoder-decoder one (T5); it was made by {name}, {why}")

    @property
    def cfg(self) -> Any:
        model = self.model
        blocks = getattr(model, "blocks", None)
        if model is None or blocks is None or not len(blocks) or not hasattr(blocks[0], "attn") \
                or not hasattr(model, "cfg") or getattr(model, "is_encoder_decoder", False):
            raise self._unsupported()
        return model.cfg

    def _stream(self, stack: str | None) -> ResidStream:
        """The residual stream the methods decompose: the model's one (stack None), or T5's `stack`."""
        model = self.model
        if getattr(model, "is_encoder_decoder", False):
            if stack is None:
                raise self._unsupported()
            if stack not in STACKS:
                raise ValueError(f"stack must be 'encoder' or 'decoder', got {stack!r}")
            part, cfg = getattr(model, stack), model.cfg
            cross = stack == "decoder"
            return ResidStream(prefix=f"{stack}.", blocks=part.blocks, ln_final=part.ln_final,
                               n_layers=len(part.blocks), n_heads=cfg.n_heads,
                               attns=("attn", "cross_attn") if cross else ("attn",),
                               mlp_ln="ln3" if cross else "ln2")
        cfg = self.cfg
        if stack is not None:
            raise ValueError(f"stack={stack!r} is for encoder-decoder models (T5), whose caches hold two residual "
                             f"streams; {type(model).__name__} has one: call without stack")
        return ResidStream(prefix="", blocks=model.blocks, ln_final=getattr(model, "ln_final", None),
                           n_layers=cfg.n_layers, n_heads=cfg.n_heads)

    def _last(self, layer: int | None, s: ResidStream) -> int:
        """TransformerLens's `layer` argument: None or -1 means after the last block (n_layers)."""
        n = s.n_layers
        if layer is None or layer == -1:
            return n
        if not -n <= layer <= n:
            raise ValueError(f"layer={layer} is out of range for a model of {n} layers")
        return layer % (n + 1) if layer < 0 else layer

    def _need(self, *names: str) -> None:
        missing = [n for n in names if n not in self]
        if missing:
            raise ValueError(f"this method needs activations that were not cached: {missing[:4]}; run "
                             f"run_with_cache without a names_filter (or one that includes them)")

    def _pos(self, x: Tensor, pos_slice: PosSlice, dim: int = -2) -> Tensor:
        return slice_dim(x, pos_slice, dim)

    # -- the residual stream, stacked ----------------------------------------------------------------------------
    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: PosSlice = None, mlp_input: bool = False,
                          return_labels: bool = False, stack: str | None = None) -> Any:
        """The residual stream entering each block up to `layer` (`resid_pre` 0..layer-1; layer None or n_layers
        adds the final `resid_post`): (components, batch, pos, d_model). `incl_mid` adds each block's
        `resid_mid` (T5 decoder: and `resid_mid_cross`); `mlp_input` adds layer `layer`'s. With `apply_ln`, each is
        passed through the LayerNorm that reads layer `layer`: its cached scale, or after the last block ln_final
        itself applied to each state (TransformerLens 3.x), so `... @ W_U + b_U` is the logit lens (T5: times
        `model.output_scale`). `stack`: T5's "encoder" or "decoder" (required there, refused elsewhere)."""
        s = self._stream(stack)
        layer = self._last(layer, s)
        n = s.n_layers
        parts, labels = [], []
        for i in range(layer + 1):
            if i == n:
                parts.append(self[s.hook(n - 1, "resid_post")])
                labels.append("final_post")
                continue
            parts.append(self[s.hook(i, "resid_pre")])
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                for mid in s.mids:
                    parts.append(self[s.hook(i, mid)])
                    labels.append(f"{i}_{mid.removeprefix('resid_')}")
        out = torch.stack([self._pos(p, pos_slice) for p in parts])
        if apply_ln:  # as TL 3.x: after the last block, ln_final (weight and bias too) on each state alone
            out = self.apply_ln_to_stack(out, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                         recompute_ln=layer == n, stack=stack)
        return (out, labels) if return_labels else out

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: PosSlice = None, incl_embeds: bool = True,
                        return_labels: bool = False, stack: str | None = None) -> Any:
        """What each component wrote into the residual stream entering `layer`: the embeddings, then each
        block's attention and MLP output (`mode` "attn" or "mlp" keeps one kind): (components, batch, pos,
        d_model), summing to that residual stream. `mlp_input` adds block `layer`'s attention output.
        `stack`: T5's "encoder" or "decoder" (required there, refused elsewhere); a decoder block writes
        `{l}_attn_out`, `{l}_cross_attn_out` ("attn" mode keeps both) and `{l}_mlp_out`."""
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        s = self._stream(stack)
        layer = self._last(layer, s)
        parts, labels = [], []
        if incl_embeds:
            for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
                if s.prefix + name in self:
                    parts.append(self[s.prefix + name])
                    labels.append(label)
        for i in range(layer + (1 if mlp_input else 0)):
            if mode != "mlp":
                for out_name in s.attn_outs:
                    parts.append(self[s.hook(i, out_name)])
                    labels.append(f"{i}_{out_name}")
            if mode != "attn" and i < layer:
                parts.append(self[s.hook(i, "mlp_out")])
                labels.append(f"{i}_mlp_out")
        out = torch.stack([self._pos(p, pos_slice) for p in parts])
        if apply_ln:
            out = self.apply_ln_to_stack(out, layer, mlp_input=mlp_input, pos_slice=pos_slice, stack=stack)
        return (out, labels) if return_labels else out

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice: PosSlice = None, return_labels: bool = False,
                                     stack: str | None = None) -> Any:
        """The finest decomposition: every head, every neuron (or each MLP whole, `expand_neurons=False`), the
        embeddings and a bias term (all the output biases), summing to the residual stream entering `layer`.
        `stack`: T5's "encoder" or "decoder" (required there, refused elsewhere; T5 has no biases: zeros)."""
        s = self._stream(stack)
        layer = self._last(layer, s)
        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), return_labels=True,
                                                pos_slice=pos_slice, stack=stack)
        parts = [heads]
        if layer > 0:
            if expand_neurons:
                neurons, neuron_labels = self.stack_neuron_results(layer, return_labels=True, pos_slice=pos_slice,
                                                                   stack=stack)
                parts.append(neurons)
                labels = labels + neuron_labels
            else:
                mlps, mlp_labels = self.decompose_resid(layer, mode="mlp", incl_embeds=False, pos_slice=pos_slice,
                                                        return_labels=True, stack=stack)
                parts.append(mlps)
                labels = labels + mlp_labels
        embeds, embed_labels = self.decompose_resid(0, incl_embeds=True, pos_slice=pos_slice, return_labels=True,
                                                    stack=stack)
        parts.append(embeds)
        labels = labels + embed_labels
        bias = self._accumulated_bias(s, layer, mlp_input, include_mlp_biases=expand_neurons)
        parts.append(bias.to(embeds.dtype).expand_as(embeds[0])[None])
        labels = labels + ["bias"]
        out = torch.cat(parts)
        if apply_ln:
            out = self.apply_ln_to_stack(out, layer, mlp_input=mlp_input, pos_slice=pos_slice, stack=stack)
        return (out, labels) if return_labels else out

    def _accumulated_bias(self, s: ResidStream, layer: int, mlp_input: bool,
                          include_mlp_biases: bool) -> Float[Tensor, " d_model"]:
        """The model's `accumulated_bias` (decoder-only), or the same sum over one T5 stack's blocks."""
        if not s.prefix:
            return self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=include_mlp_biases)
        total = torch.zeros_like(s.blocks[0].attn.b_O)
        for i, b in enumerate(s.blocks[:layer + (1 if mlp_input else 0)]):
            total = total + sum(getattr(b, a).b_O for a in s.attns)
            if include_mlp_biases and i < layer:
                total = total + b.mlp.b_out
        return total

    # -- heads and neurons -----------------------------------------------------------------------------------
    def compute_head_results(self, stack: str | None = None) -> None:
        """Add `blocks.{l}.attn.hook_result` (each head's output in d_model, without the output bias) computed
        from the cached `hook_z` and W_O, for a run made without `set_use_attn_result(True)`. `stack`: T5's
        "encoder" or "decoder" (`decoder.blocks.{l}.attn.hook_result` and `...cross_attn.hook_result`)."""
        s = self._stream(stack)
        for i in range(s.n_layers):
            for a in s.attns:
                name = s.hook(i, f"{a}.hook_result")
                if name not in self:
                    self._need(s.hook(i, f"{a}.hook_z"))
                    z, W_O = self[s.hook(i, f"{a}.hook_z")], getattr(s.blocks[i], a).W_O
                    self[name] = torch.einsum("...hd,hdm->...hm", z, W_O.to(z.dtype)).detach()

    def stack_head_results(self, layer: int | None = None, return_labels: bool = False,
                           incl_remainder: bool = False, pos_slice: PosSlice = None,
                           apply_ln: bool = False, stack: str | None = None) -> Any:
        """Every head's output in d_model for blocks before `layer`: (layer * n_heads, batch, pos, d_model),
        labelled `L{l}H{h}`; + the output biases, they sum to the attention outputs. `incl_remainder` adds the
        rest of the residual stream (so the stack sums to `resid_post` of block layer - 1). `stack`: T5's
        "encoder" or "decoder" (required there, refused elsewhere); in the decoder each block's cross-attention
        heads `L{l}CH{h}` follow its self-attention heads (T5 has no output biases)."""
        s = self._stream(stack)
        layer = self._last(layer, s)
        if layer and s.hook(0, "attn.hook_result") not in self:
            how = "" if s.prefix else " (set_use_attn_result(True) caches it)"
            warnings.warn(f"hook_result was not cached{how}: computing it from hook_z and W_O", stacklevel=2)
            self.compute_head_results(stack)
        tags = {"attn": "H", "cross_attn": "CH"}
        labels = [f"L{i}{tags[a]}{h}" for i in range(layer) for a in s.attns for h in range(s.n_heads)]
        results = [self._pos(self[s.hook(i, f"{a}.hook_result")], pos_slice, dim=-3)
                   for i in range(layer) for a in s.attns]
        first = self[s.hook(0, "resid_pre")]
        if results:
            out = torch.cat(results, dim=-2).movedim(-2, 0)  # (layer head) ... d_model
        else:
            out = torch.zeros(0, *self._pos(first, pos_slice).shape, device=first.device)
        if incl_remainder:
            resid = self[s.hook(layer - 1, "resid_post")] if layer else first
            out = torch.cat([out, (self._pos(resid, pos_slice) - out.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            out = self.apply_ln_to_stack(out, layer, pos_slice=pos_slice, stack=stack)
        return (out, labels) if return_labels else out

    def get_neuron_results(self, layer: int, neuron_slice: PosSlice = None, pos_slice: PosSlice = None,
                           stack: str | None = None) -> Float[Tensor, "batch *pos neuron d_model"]:
        """Each neuron's output of block `layer`: its activation (`mlp.hook_post`) times its row of W_out."""
        s = self._stream(stack)
        post = self._pos(self[s.hook(layer, "mlp.hook_post")], pos_slice)
        W_out = s.blocks[layer].mlp.W_out
        post, W_out = slice_dim(post, neuron_slice, -1), slice_dim(W_out, neuron_slice, 0)
        return post[..., None] * W_out.to(post.dtype)

    def stack_neuron_results(self, layer: int | None = None, pos_slice: PosSlice = None,
                             neuron_slice: PosSlice = None, return_labels: bool = False,
                             incl_remainder: bool = False, apply_ln: bool = False, stack: str | None = None) -> Any:
        """Every neuron's output for blocks before `layer`: (neurons, batch, pos, d_model), labelled
        `L{l}N{n}`; + the MLP output biases, they sum to the MLP outputs. Memory: d_mlp x d_model per position.
        `stack`: T5's "encoder" or "decoder" (required there, refused elsewhere)."""
        s = self._stream(stack)
        layer = self._last(layer, s)
        ids = torch.arange(self.model.cfg.d_mlp)
        ids = slice_dim(ids, neuron_slice, 0).reshape(-1).tolist()
        labels = [f"L{i}N{n}" for i in range(layer) for n in ids]
        parts = [self.get_neuron_results(i, neuron_slice, pos_slice, stack=stack) for i in range(layer)]
        if parts:
            out = torch.cat(parts, dim=-2).movedim(-2, 0)
        else:
            out = torch.zeros(0, *self._pos(self[s.hook(0, "resid_pre")], pos_slice).shape)
        if incl_remainder:
            resid = self[s.hook(layer - 1, "resid_post")] if layer else self[s.hook(0, "resid_pre")]
            out = torch.cat([out, (self._pos(resid, pos_slice) - out.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            out = self.apply_ln_to_stack(out, layer, pos_slice=pos_slice, stack=stack)
        return (out, labels) if return_labels else out

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None,
                         stack: str | None = None) -> Float[Tensor, "layer ..."]:
        """One activation of every block before `layer`, stacked: `stack_activation("pattern")` is
        (n_layers, batch, head, q_pos, k_pos). `stack`: T5's "encoder" or "decoder" (required there)."""
        s = self._stream(stack)
        layer = self._last(layer, s)
        return torch.stack([self[s.prefix + act_name(activation_name, i, sublayer_type)] for i in range(layer)])

    # -- LayerNorm and logits ----------------------------------------------------------------------------------
    def apply_ln_to_stack(self, residual_stack: Float[Tensor, "components ... d_model"], layer: int | None = None,
                          mlp_input: bool = False, pos_slice: PosSlice = None, batch_slice: PosSlice = None,
                          has_batch_dim: bool = True, recompute_ln: bool = False, stack: str | None = None) -> Tensor:
        """Each component as the LayerNorm reading layer `layer` (ln_final for None / n_layers, else block
        `layer`'s ln1, or ln2 with `mlp_input`) sees it: centred and divided by the scale that LayerNorm computed
        on the whole residual stream (cached as `hook_scale`). This is linear, so the results still sum to the
        normalised stream. The LayerNorm's weight and bias are not applied (as in TransformerLens): fold them
        into the next layer with `fold_ln=True`. `recompute_ln` (final LayerNorm only) applies ln_final
        to each component alone instead (not linear: for whole residual states, the logit lens). `stack`: T5's
        "encoder" or "decoder" (required there, refused elsewhere): that stack's final norm (`final_layer_norm`)
        or block norms (the decoder's MLP reads ln3); RMS norms, so nothing is centred."""
        s = self._stream(stack)
        layer = self._last(layer, s)
        norm = getattr(self.model, "normalization_type", "LN")
        if has_batch_dim and batch_slice is not None:
            residual_stack = slice_dim(residual_stack, batch_slice, 1)
        if recompute_ln and layer == s.n_layers:  # the logit lens: ln_final on each component alone
            return s.ln_final(residual_stack)
        if norm in ("LN", "LNPre"):
            residual_stack = residual_stack - residual_stack.mean(dim=-1, keepdim=True)
        if layer == s.n_layers:
            name, norm_module = s.prefix + "ln_final.hook_scale", s.ln_final
        else:
            ln = s.mlp_ln if mlp_input else "ln1"
            name, norm_module = s.hook(layer, f"{ln}.hook_scale"), getattr(s.blocks[layer], ln)
        if hasattr(norm_module, "hook_scale"):
            self._need(name)
            scale = self._pos(self[name], pos_slice)
        else:  # an RMSNorm without a scale hook (Llama-family, T5): its scale from the cached stream it normalised
            scale = self._pos(self._rms_scale(layer, mlp_input, norm_module.eps, s), pos_slice)
        if self.has_batch_dim and batch_slice is not None:
            scale = slice_dim(scale, batch_slice, 0)
        return residual_stack / scale

    def _rms_scale(self, layer: int, mlp_input: bool, eps: float, s: ResidStream) -> Float[Tensor, "batch pos 1"]:
        """sqrt(mean(x^2) + eps) of the residual stream the RMSNorm reading layer `layer` saw (TL's RMS hook_scale),
        computed in float32 as Llama's RMSNorm does."""
        n = s.n_layers
        if layer == n:
            name = s.hook(n - 1, "resid_post")
        else:
            name = s.hook(layer, s.mids[-1] if mlp_input else "resid_pre")
        self._need(name)
        x = self[name].float()
        return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt().to(self[name].dtype)

    def logit_attrs(self, residual_stack: Float[Tensor, "components ... d_model"],
                    tokens: str | int | Int[Tensor, "..."], incorrect_tokens: str | int | Tensor | None = None,
                    pos_slice: PosSlice = None, batch_slice: PosSlice = None,
                    has_batch_dim: bool = True, stack: str | None = None) -> Float[Tensor, "components ..."]:
        """Each component's direct effect on the logit of `tokens` (minus that of `incorrect_tokens`): the
        component through the final LayerNorm's cached scale, dotted with the tokens' residual directions.
        `tokens` is one token (id or string) or one per batch row (batch,). T5: `stack="decoder"` (required; the
        encoder's stream reaches no logits), and as T5's weights are not processed, the decoder's final-norm
        weight and the output rescale (`model.output_scale`, d_model**-0.5 in original T5) are folded into the
        directions, so the attributions of a decomposition sum to the logits (T5's unembedding has no bias)."""
        s = self._stream(stack)
        if s.prefix == "encoder.":
            raise ValueError("logit_attrs reads the unembedding, which only the decoder's residual stream reaches: "
                             "pass stack='decoder'")
        directions = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            wrong = self.model.tokens_to_residual_directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise ValueError(f"tokens and incorrect_tokens must have the same shape, got directions of "
                                 f"{tuple(directions.shape)} and {tuple(wrong.shape)}")
            directions = directions - wrong
        if s.prefix:  # T5: as fold_ln would fold them into W_U
            directions = directions * (s.ln_final.weight * getattr(self.model, "output_scale", 1.0)).to(directions)
        if isinstance(batch_slice, int | slice | list | Tensor) and directions.ndim > 1:
            directions = slice_dim(directions, batch_slice, 0)
        scaled = self.apply_ln_to_stack(residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim, stack=stack)
        if directions.ndim == 1:  # one token for all
            return scaled @ directions.to(scaled.dtype)
        # one direction per batch row: broadcast over components and any position dims in between
        d = directions.to(scaled.dtype)
        d = d.view(d.shape[0], *([1] * (scaled.ndim - 3)), d.shape[-1]) if scaled.ndim > 3 else d
        return (scaled * d).sum(-1)
