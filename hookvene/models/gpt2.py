"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners") with a HookPoint on every
activation.

Features of the architecture:
- learned absolute position embeddings added to token embeddings;
- pre-LayerNorm blocks: x + attn(ln1(x)), then x + mlp(ln2(x));
- causal multi-head attention with q, k, v fused in one projection and scores scaled by 1/sqrt(d_head);
- MLP with the tanh-approximated GELU ("gelu_new"), d_mlp = 4 * d_model by default;
- a final LayerNorm, and an unembedding tied to the token embedding.

Parameters mirror the HuggingFace checkpoint (GPT-2's Conv1D stores weights as (in, out), and q, k, v stay fused),
so loading is a renaming table (`hookvene/loading/gpt2.py`). There is no dropout: this is an analysis model, and
`transformers` in eval mode computes the same function.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from hookvene.hooks import HookPoint
from hookvene.models.common import (
    ACTIVATIONS,
    CausalLM,
    Conv1D,
    HFAliases,
    HookedModel,
    KVCache,
    LayerNorm,
    ModelOutput,
    alias,
    attend,
    attention_input,
    causal_mask,
    check_length,
    check_tokens,
    identity_alias,
    layer_slice,
    merge_heads,
    project_heads,
    runtime_flags,
    split_heads,
)


@runtime_flags
@dataclass(frozen=True, kw_only=True)
class GPT2Config(HFAliases):
    d_vocab: int = 50257
    n_ctx: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_mlp: int | None = None  # None: 4 * d_model, as in `transformers`
    act_fn: str = "gelu_new"
    ln_eps: float = 1e-5
    tie_word_embeddings: bool = True

    # TransformerLens's cfg names (see HFAliases in models/common.py)
    tl_cfg: ClassVar[dict[str, str | None]] = {"normalization_type": "LN", "positional_embedding_type": "standard"}
    hf_aliases: ClassVar[dict[str, str]] = {
        "vocab_size": "d_vocab", "n_positions": "n_ctx", "max_position_embeddings": "n_ctx",
        "n_embd": "d_model", "hidden_size": "d_model", "n_layer": "n_layers", "num_hidden_layers": "n_layers",
        "n_head": "n_heads", "num_attention_heads": "n_heads", "n_inner": "d_mlp",
        "layer_norm_epsilon": "ln_eps", "activation_function": "act_fn",
    }

    def __post_init__(self) -> None:
        if self.d_mlp is None:
            object.__setattr__(self, "d_mlp", 4 * self.d_model)  # frozen dataclass: set once, here
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn={self.act_fn!r} is not supported; choose one of {sorted(ACTIVATIONS)}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


class Attention(nn.Module):
    """Causal multi-head self-attention; q, k, v come from one fused projection (HF: attn.c_attn)."""

    def __init__(self, cfg: GPT2Config, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.scale = layer, cfg.n_heads, cfg.d_head**-0.5
        self.qkv = Conv1D(cfg.d_model, 3 * cfg.d_model)
        self.out = Conv1D(cfg.d_model, cfg.d_model)  # HF: attn.c_proj
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern, self.hook_z = HookPoint(), HookPoint(), HookPoint()
        self.hook_result = HookPoint()  # fires with use_attn_result only

    use_attn_result = False  # HookedModel.set_use_attn_result

    def forward(self, x: Float[Tensor, "batch pos d_model"] | tuple[Tensor, Tensor, Tensor], mask: Tensor | None,
                cache: KVCache | None) -> Float[Tensor, "batch pos d_model"]:
        if isinstance(x, tuple):  # split inputs (attention_input): each head projects its own copy
            q, k, v = (project_heads(xi, W, b) for xi, W, b in
                       zip(x, (self.W_Q, self.W_K, self.W_V), (self.b_Q, self.b_K, self.b_V)))
        else:
            q, k, v = (split_heads(t, self.n_heads) for t in self.qkv(x).split(x.shape[-1], dim=-1))
        q = self.hook_q(q)  # batch pos head d_head
        k = self.hook_k(k)
        v = self.hook_v(v)
        if cache is not None:  # generation: attend to the cached prefix too; hooks saw only the new positions
            k, v = cache.update(self.layer, k, v)
        # z = softmax(q k^T / sqrt(d_head) + mask) v, per head
        z = attend(q, k, v, mask, causal=True, scale=self.scale,
                   hook_scores=self.hook_attn_scores, hook_pattern=self.hook_pattern)
        z = self.hook_z(z)  # batch pos head d_head: each head's mix of values, before the output projection
        if self.use_attn_result:  # each head's output in d_model, then their sum: head x the memory
            return self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O)).sum(2) + self.b_O
        return self.out(merge_heads(z))

    # TransformerLens's weight layout, as views of the fused parameters: an edit through them reaches the model.
    def _qkv_part(self, i: int) -> Float[Tensor, "head d_model d_head"]:
        d = self.out.weight.shape[0]
        return self.qkv.weight[:, i * d:(i + 1) * d].view(d, self.n_heads, -1).transpose(0, 1)

    W_Q = property(lambda self: self._qkv_part(0))
    W_K = property(lambda self: self._qkv_part(1))
    W_V = property(lambda self: self._qkv_part(2))
    b_Q = property(lambda self: self.qkv.bias.view(3, self.n_heads, -1)[0])  # head d_head
    b_K = property(lambda self: self.qkv.bias.view(3, self.n_heads, -1)[1])
    b_V = property(lambda self: self.qkv.bias.view(3, self.n_heads, -1)[2])
    W_O = property(lambda self: self.out.weight.view(self.n_heads, -1, self.out.weight.shape[1]))  # head d_head d_model
    b_O = property(lambda self: self.out.bias)


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.fc = Conv1D(cfg.d_model, cfg.d_mlp)  # HF: mlp.c_fc
        self.proj = Conv1D(cfg.d_mlp, cfg.d_model)  # HF: mlp.c_proj
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(self.fc(x))  # batch pos d_mlp
        post = self.hook_post(self.act(pre))
        return self.proj(post)

    # TransformerLens's names: Conv1D weights are already (in, out), so these are the parameters themselves
    W_in, b_in = property(lambda self: self.fc.weight), property(lambda self: self.fc.bias)
    W_out, b_out = property(lambda self: self.proj.weight), property(lambda self: self.proj.bias)


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int) -> None:
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.attn = Attention(cfg, layer)
        self.ln2 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.mlp = MLP(cfg)
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()
        # TransformerLens's opt-in hooks (HookedModel.set_use_split_qkv_input / set_use_attn_in /
        # set_use_hook_mlp_in); they fire only when their flag is on
        self.hook_q_input, self.hook_k_input, self.hook_v_input = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_in, self.hook_mlp_in = HookPoint(), HookPoint()

    use_split_qkv_input = use_attn_in = use_hook_mlp_in = False

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"], mask: Tensor | None,
                cache: KVCache | None) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(attention_input(self, resid_pre), mask, cache))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if self.use_hook_mlp_in else resid_mid
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mlp_in)))
        return self.hook_resid_post(resid_mid + mlp_out)


class GPT2(HookedModel):
    """GPT-2 without the LM head: returns `ModelOutput.last_hidden_state` (after the final LayerNorm)."""

    can_resume = True  # forward(start_at_layer=, stop_at_layer=): sweeps resume mid-model

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)  # HF: wte
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)  # HF: wpe
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()

    def forward(self, input_ids: Int[Tensor, "batch pos"] | None = None,
                attention_mask: Int[Tensor, "batch k_pos"] | None = None,
                position_ids: Int[Tensor, "batch pos"] | None = None,
                inputs_embeds: Float[Tensor, "batch pos d_model"] | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                start_at_layer: int | None = None, stop_at_layer: int | None = None) -> ModelOutput:
        """`attention_mask` covers the cached prefix plus the new positions (1 = real token, 0 = padding).
        Positions default to 0, 1, ... after the cached prefix, as in `transformers`; left-padded generation
        passes `position_ids` explicitly. With `start_at_layer=l` (TransformerLens's name), `inputs_embeds` is
        the residual stream entering block l and the blocks before it are skipped (patching sweeps resume
        from cached states this way). With `stop_at_layer=l`, the run stops before block l and
        `last_hidden_state` is the residual stream there (no final LayerNorm, no logits); together they run
        one block at a time."""
        blocks = layer_slice(start_at_layer, stop_at_layer, self.cfg.n_layers)
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past = len(cache) if cache is not None else 0
        if inputs_embeds is None:
            check_tokens(input_ids, self.cfg.d_vocab, self.cfg.n_ctx, past)
            inputs_embeds = self.embed(input_ids)
        n_pos = inputs_embeds.shape[1]
        check_length(past + n_pos, self.cfg.n_ctx)  # also for inputs_embeds: the position table ends at n_ctx
        if position_ids is None:
            position_ids = torch.arange(past, past + n_pos, device=inputs_embeds.device).expand(len(inputs_embeds), -1)
        mask = causal_mask(attention_mask, n_pos, past + n_pos, inputs_embeds.dtype, inputs_embeds.device)
        x = inputs_embeds
        if start_at_layer is None:
            x = self.hook_embed(x) + self.hook_pos_embed(self.pos_embed(position_ids))
        for block in self.blocks[blocks]:
            x = block(x, mask, cache)
        if stop_at_layer is not None:
            return ModelOutput(last_hidden_state=x, past_key_values=cache)
        return ModelOutput(last_hidden_state=self.ln_final(x), past_key_values=cache)


class GPT2LM(CausalLM, GPT2):
    """GPT-2 with its (tied) unembedding: also returns `logits`, and `loss` when `labels` are given."""


# -- HuggingFace attribute names ----------------------------------------------------------------------------------
# Code written for `transformers` reaches into the model by HF's names (`gpt2.wte.weight`, `model.transformer.h[0]`,
# `gpt2.config.n_embd`): these aliases answer to them. Hook names do not change.
GPT2.config, GPT2.wte, GPT2.wpe = alias("cfg"), alias("embed"), alias("pos_embed")
GPT2.h, GPT2.ln_f = alias("blocks"), alias("ln_final")
GPT2.transformer = property(lambda self: self, doc="HuggingFace's `model.transformer`: the model itself.")
GPT2LM.lm_head = alias("unembed")
# Inside the blocks (pyvene's test oracles rebuild the forward from these): `h[i].ln_1`, `h[i].attn.c_attn`, ...
Block.ln_1, Block.ln_2 = alias("ln1"), alias("ln2")
Attention.c_attn, Attention.c_proj = alias("qkv"), alias("out")
Attention.num_heads = alias("n_heads")
Attention.split_size = property(lambda self: self.out.weight.shape[0], doc="HuggingFace's split_size: d_model.")
Attention.head_dim = property(lambda self: self.out.weight.shape[0] // self.n_heads, doc="d_head.")
Attention.attn_dropout, Attention.resid_dropout = identity_alias("attn_dropout"), identity_alias("resid_dropout")
MLP.c_fc, MLP.c_proj, MLP.dropout = alias("fc"), alias("proj"), identity_alias("dropout")
# `outputs.hidden_states` / `outputs.attentions` (see HookedModel.__call__)
GPT2.hidden_state_hooks, GPT2.attention_hook = ("blocks.{i}.hook_resid_pre", "ln_final.hook_normalized"), \
    "blocks.{i}.attn.hook_pattern"
