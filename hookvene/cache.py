"""TransformerLens's `ActivationCache` analysis methods: the residual stream taken apart into what each component wrote.

`model.run_with_cache(...)` returns this class for every hookvene model. The methods read hook names
(`blocks.{l}.hook_attn_out`, ...), the model's config (`n_layers`, `n_heads`) and its weight views
(`blocks[l].attn.W_O`, `blocks[l].mlp.W_out`, `tokens_to_residual_directions`), so they work on the decoder-only
transformers (GPT-2, GPT-Neo, GPT-NeoX, Llama / Mistral / Qwen2) and raise a ValueError saying so on T5 (two stacks:
not implemented), the GRU and the MLP classifier (no transformer to decompose). Semantics follow TransformerLens 3.x,
names included:

    accumulated_resid   the residual stream entering each layer (the logit lens)
    decompose_resid     embeddings + each attention / MLP output: sums to the residual stream entering `layer`
    stack_head_results  each head's output in d_model (z @ W_O per head), labelled L{l}H{h}
    stack_neuron_results  each neuron's output (post activation x its row of W_out), labelled L{l}N{n}
    apply_ln_to_stack   what the final (or a block's) LayerNorm does to each component, with the *cached* scale
    logit_attrs         each component's direct contribution to a token's logit (or a logit difference)

As in TransformerLens, `apply_ln_to_stack` centres and divides by the LayerNorm scale but does not apply its weight
and bias: load with `fold_ln=True` (see `hookvene.from_pretrained`) for attributions that sum to the logits.
"""

import warnings
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


class ActivationCache(BaseCache):
    """Activations by hook name, with TransformerLens's decompositions of the residual stream (module docstring)."""

    # -- what the methods need from the model ------------------------------------------------------------------
    @property
    def cfg(self) -> Any:
        model = self.model
        blocks = getattr(model, "blocks", None)
        if model is None or blocks is None or not len(blocks) or not hasattr(blocks[0], "attn") \
                or not hasattr(model, "cfg") or getattr(model, "is_encoder_decoder", False):
            name = type(model).__name__
            why = ("an encoder-decoder model: the decompositions of one residual stream are not implemented for its "
                   "two stacks; read its hooks (encoder.blocks.{l}..., decoder.blocks.{l}...) directly"
                   if getattr(model, "is_encoder_decoder", False) else
                   "not a transformer: it has no attention heads, attention outputs or residual-stream blocks to "
                   "decompose; read its hooks directly")
            raise ValueError(f"this cache's analysis methods (accumulated_resid, decompose_resid, stack_head_results, "
                             f"stack_neuron_results, apply_ln_to_stack, logit_attrs, ...) need the decoder-only "
                             f"transformer that filled it (GPT-2, GPT-Neo, GPT-NeoX, Llama / Mistral / Qwen2); "
                             f"it was made by {name}, {why}")
        return model.cfg

    def _last(self, layer: int | None) -> int:
        """TransformerLens's `layer` argument: None or -1 means after the last block (n_layers)."""
        n = self.cfg.n_layers
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
                          return_labels: bool = False) -> Any:
        """The residual stream entering each block up to `layer` (`resid_pre` 0..layer-1; layer None or n_layers
        adds the final `resid_post`): (components, batch, pos, d_model). `incl_mid` adds each block's
        `resid_mid`; `mlp_input` adds layer `layer`'s. With `apply_ln`, each is passed through the LayerNorm that
        reads layer `layer`: its cached scale, or after the last block ln_final itself applied to each state
        (TransformerLens 3.x), so `... @ W_U + b_U` is the logit lens."""
        layer = self._last(layer)
        n = self.cfg.n_layers
        parts, labels = [], []
        for i in range(layer + 1):
            if i == n:
                parts.append(self[act_name("resid_post", n - 1)])
                labels.append("final_post")
                continue
            parts.append(self[act_name("resid_pre", i)])
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                parts.append(self[act_name("resid_mid", i)])
                labels.append(f"{i}_mid")
        stack = torch.stack([self._pos(p, pos_slice) for p in parts])
        if apply_ln:  # as TL 3.x: after the last block, ln_final (weight and bias too) on each state alone
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           recompute_ln=layer == self.cfg.n_layers)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: PosSlice = None, incl_embeds: bool = True,
                        return_labels: bool = False) -> Any:
        """What each component wrote into the residual stream entering `layer`: the embeddings, then each
        block's attention and MLP output (`mode` "attn" or "mlp" keeps one kind): (components, batch, pos,
        d_model), summing to that residual stream. `mlp_input` adds block `layer`'s attention output."""
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._last(layer)
        parts, labels = [], []
        if incl_embeds:
            for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
                if name in self:
                    parts.append(self[name])
                    labels.append(label)
        for i in range(layer + (1 if mlp_input else 0)):
            if mode != "mlp":
                parts.append(self[act_name("attn_out", i)])
                labels.append(f"{i}_attn_out")
            if mode != "attn" and i < layer:
                parts.append(self[act_name("mlp_out", i)])
                labels.append(f"{i}_mlp_out")
        stack = torch.stack([self._pos(p, pos_slice) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice: PosSlice = None, return_labels: bool = False) -> Any:
        """The finest decomposition: every head, every neuron (or each MLP whole, `expand_neurons=False`), the
        embeddings and a bias term (all the output biases), summing to the residual stream entering `layer`."""
        layer = self._last(layer)
        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), return_labels=True,
                                                pos_slice=pos_slice)
        parts = [heads]
        if layer > 0:
            if expand_neurons:
                neurons, neuron_labels = self.stack_neuron_results(layer, return_labels=True, pos_slice=pos_slice)
                parts.append(neurons)
                labels = labels + neuron_labels
            else:
                mlps, mlp_labels = self.decompose_resid(layer, mode="mlp", incl_embeds=False, pos_slice=pos_slice,
                                                        return_labels=True)
                parts.append(mlps)
                labels = labels + mlp_labels
        embeds, embed_labels = self.decompose_resid(0, incl_embeds=True, pos_slice=pos_slice, return_labels=True)
        parts.append(embeds)
        labels = labels + embed_labels
        bias = self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        parts.append(bias.expand_as(embeds[0])[None])
        labels = labels + ["bias"]
        stack = torch.cat(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # -- heads and neurons -----------------------------------------------------------------------------------
    def compute_head_results(self) -> None:
        """Add `blocks.{l}.attn.hook_result` (each head's output in d_model, without the output bias) computed
        from the cached `hook_z` and W_O, for a run made without `set_use_attn_result(True)`."""
        for i in range(self.cfg.n_layers):
            name = act_name("result", i)
            if name not in self:
                self._need(act_name("z", i))
                z, W_O = self[act_name("z", i)], self.model.blocks[i].attn.W_O
                self[name] = torch.einsum("...hd,hdm->...hm", z, W_O.to(z.dtype)).detach()

    def stack_head_results(self, layer: int | None = None, return_labels: bool = False,
                           incl_remainder: bool = False, pos_slice: PosSlice = None,
                           apply_ln: bool = False) -> Any:
        """Every head's output in d_model for blocks before `layer`: (layer * n_heads, batch, pos, d_model),
        labelled `L{l}H{h}`; + the output biases, they sum to the attention outputs. `incl_remainder` adds the
        rest of the residual stream (so the stack sums to `resid_post` of block layer - 1)."""
        layer = self._last(layer)
        if layer and act_name("result", 0) not in self:
            warnings.warn("hook_result was not cached (set_use_attn_result(True) caches it): computing it from "
                          "hook_z and W_O", stacklevel=2)
            self.compute_head_results()
        labels = [f"L{i}H{h}" for i in range(layer) for h in range(self.cfg.n_heads)]
        results = [self._pos(self[act_name("result", i)], pos_slice, dim=-3) for i in range(layer)]
        if results:
            stack = torch.cat(results, dim=-2).movedim(-2, 0)  # (layer head) ... d_model
        else:
            shape = self._pos(self[act_name("resid_pre", 0)], pos_slice).shape
            stack = torch.zeros(0, *shape, device=self[act_name("resid_pre", 0)].device)
        if incl_remainder:
            resid = self[act_name("resid_post", layer - 1)] if layer else self[act_name("resid_pre", 0)]
            stack = torch.cat([stack, (self._pos(resid, pos_slice) - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def get_neuron_results(self, layer: int, neuron_slice: PosSlice = None,
                           pos_slice: PosSlice = None) -> Float[Tensor, "batch pos neuron d_model"]:
        """Each neuron's output of block `layer`: its activation (`mlp.hook_post`) times its row of W_out."""
        post = self._pos(self[act_name("post", layer)], pos_slice)
        W_out = self.model.blocks[layer].mlp.W_out
        post, W_out = slice_dim(post, neuron_slice, -1), slice_dim(W_out, neuron_slice, 0)
        return post[..., None] * W_out.to(post.dtype)

    def stack_neuron_results(self, layer: int | None = None, pos_slice: PosSlice = None,
                             neuron_slice: PosSlice = None, return_labels: bool = False,
                             incl_remainder: bool = False, apply_ln: bool = False) -> Any:
        """Every neuron's output for blocks before `layer`: (neurons, batch, pos, d_model), labelled
        `L{l}N{n}`; + the MLP output biases, they sum to the MLP outputs. Memory: d_mlp x d_model per position."""
        layer = self._last(layer)
        ids = torch.arange(self.cfg.d_mlp)
        ids = slice_dim(ids, neuron_slice, 0).reshape(-1).tolist()
        labels = [f"L{i}N{n}" for i in range(layer) for n in ids]
        parts = [self.get_neuron_results(i, neuron_slice, pos_slice) for i in range(layer)]
        if parts:
            stack = torch.cat(parts, dim=-2).movedim(-2, 0)
        else:
            stack = torch.zeros(0, *self._pos(self[act_name("resid_pre", 0)], pos_slice).shape)
        if incl_remainder:
            resid = self[act_name("resid_post", layer - 1)] if layer else self[act_name("resid_pre", 0)]
            stack = torch.cat([stack, (self._pos(resid, pos_slice) - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_activation(self, activation_name: str, layer: int = -1,
                         sublayer_type: str | None = None) -> Float[Tensor, "layer ..."]:
        """One activation of every block before `layer`, stacked: `stack_activation("pattern")` is
        (n_layers, batch, head, q_pos, k_pos)."""
        layer = self._last(layer)
        return torch.stack([self[act_name(activation_name, i, sublayer_type)] for i in range(layer)])

    # -- LayerNorm and logits ----------------------------------------------------------------------------------
    def apply_ln_to_stack(self, residual_stack: Float[Tensor, "components ... d_model"], layer: int | None = None,
                          mlp_input: bool = False, pos_slice: PosSlice = None, batch_slice: PosSlice = None,
                          has_batch_dim: bool = True, recompute_ln: bool = False) -> Tensor:
        """Each component as the LayerNorm reading layer `layer` (ln_final for None / n_layers, else block
        `layer`'s ln1, or ln2 with `mlp_input`) sees it: centred and divided by the scale that LayerNorm computed
        on the whole residual stream (cached as `hook_scale`). This is linear, so the results still sum to the
        normalised stream. The LayerNorm's weight and bias are not applied (as in TransformerLens): fold them
        into the next layer with `fold_ln=True`. `recompute_ln` (final LayerNorm only) applies ln_final
        to each component alone instead (not linear: for whole residual states, the logit lens)."""
        layer = self._last(layer)
        norm = getattr(self.model, "normalization_type", "LN")
        if has_batch_dim and batch_slice is not None:
            residual_stack = slice_dim(residual_stack, batch_slice, 1)
        if recompute_ln and layer == self.cfg.n_layers:  # the logit lens: ln_final on each component alone
            return self.model.ln_final(residual_stack)
        if norm in ("LN", "LNPre"):
            residual_stack = residual_stack - residual_stack.mean(dim=-1, keepdim=True)
        if layer == self.cfg.n_layers:
            name, norm_module = "ln_final.hook_scale", self.model.ln_final
        else:
            name = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
            norm_module = getattr(self.model.blocks[layer], "ln2" if mlp_input else "ln1")
        if hasattr(norm_module, "hook_scale"):
            self._need(name)
            scale = self._pos(self[name], pos_slice)
        else:  # an RMSNorm without a scale hook (Llama-family): its scale from the cached stream it normalised
            scale = self._pos(self._rms_scale(layer, mlp_input, norm_module.eps), pos_slice)
        if self.has_batch_dim and batch_slice is not None:
            scale = slice_dim(scale, batch_slice, 0)
        return residual_stack / scale

    def _rms_scale(self, layer: int, mlp_input: bool, eps: float) -> Float[Tensor, "batch pos 1"]:
        """sqrt(mean(x^2) + eps) of the residual stream the RMSNorm reading layer `layer` saw (TL's RMS hook_scale),
        computed in float32 as Llama's RMSNorm does."""
        n = self.cfg.n_layers
        if layer == n:
            name = act_name("resid_post", n - 1)
        else:
            name = act_name("resid_mid" if mlp_input else "resid_pre", layer)
        self._need(name)
        x = self[name].float()
        return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt().to(self[name].dtype)

    def logit_attrs(self, residual_stack: Float[Tensor, "components ... d_model"],
                    tokens: str | int | Int[Tensor, "..."], incorrect_tokens: str | int | Tensor | None = None,
                    pos_slice: PosSlice = None, batch_slice: PosSlice = None,
                    has_batch_dim: bool = True) -> Float[Tensor, "components ..."]:
        """Each component's direct effect on the logit of `tokens` (minus that of `incorrect_tokens`): the
        component through the final LayerNorm's cached scale, dotted with the tokens' residual directions.
        `tokens` is one token (id or string) or one per batch row (batch,)."""
        directions = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            wrong = self.model.tokens_to_residual_directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise ValueError(f"tokens and incorrect_tokens must have the same shape, got directions of "
                                 f"{tuple(directions.shape)} and {tuple(wrong.shape)}")
            directions = directions - wrong
        if isinstance(batch_slice, int | slice | list | Tensor) and directions.ndim > 1:
            directions = slice_dim(directions, batch_slice, 0)
        scaled = self.apply_ln_to_stack(residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        if directions.ndim == 1:  # one token for all
            return scaled @ directions.to(scaled.dtype)
        # one direction per batch row: broadcast over components and any position dims in between
        d = directions.to(scaled.dtype)
        d = d.view(d.shape[0], *([1] * (scaled.ndim - 3)), d.shape[-1]) if scaled.ndim > 3 else d
        return (scaled * d).sum(-1)
