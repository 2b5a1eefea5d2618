"""GPT-Neo (Black et al. 2021, EleutherAI; also the TinyStories models) with a HookPoint on every activation.

Identical to GPT-2 (`hookvene/models/gpt2.py`) except:
1. no 1/sqrt(d_head) score scaling, and attention is computed in float32 (`transformers` upcasts q and k: the
   unscaled scores overflow float16);
2. layers alternate global (plain causal) and local attention, where a query sees only the last `window_size`
   positions (itself included);
3. q, k, v are three separate projections without bias, stored as `nn.Linear` (out, in), as is the MLP, so
   checkpoints load without a transpose (`hookvene/loading/gpt_neo.py`).

The per-layer global/local choice is resolved in `__init__` into data, one window size per layer (a global
layer's window is the whole context), so `forward` has no branch on the layer type. There is no dropout: this
is an analysis model, and `transformers` in eval mode computes the same function.
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
    HFAliases,
    HookedModel,
    KVCache,
    LayerNorm,
    ModelOutput,
    alias,
    attend,
    attention_input,
    check_length,
    check_tokens,
    identity_alias,
    layer_slice,
    merge_heads,
    project_heads,
    runtime_flags,
    sliding_causal_mask,
    split_heads,
)


@runtime_flags
@dataclass(frozen=True, kw_only=True)
class GPTNeoConfig(HFAliases):
    """Defaults are EleutherAI/gpt-neo-125M. `attention_types`: "global" or "local", one per layer."""

    d_vocab: int = 50257
    n_ctx: int = 2048
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_mlp: int | None = None  # None: 4 * d_model, as in `transformers`
    act_fn: str = "gelu_new"
    ln_eps: float = 1e-5
    window_size: int = 256
    attention_types: tuple[str, ...] = ("global", "local") * 6
    tie_word_embeddings: bool = True

    # TransformerLens's cfg names (see HFAliases in models/common.py)
    tl_cfg: ClassVar[dict[str, str | None]] = {"normalization_type": "LN", "positional_embedding_type": "standard"}
    hf_aliases: ClassVar[dict[str, str]] = {
        "vocab_size": "d_vocab", "max_position_embeddings": "n_ctx", "n_positions": "n_ctx",
        "hidden_size": "d_model", "n_embd": "d_model", "num_layers": "n_layers", "n_layer": "n_layers",
        "num_hidden_layers": "n_layers", "num_heads": "n_heads", "n_head": "n_heads",
        "num_attention_heads": "n_heads", "intermediate_size": "d_mlp", "layer_norm_epsilon": "ln_eps",
        "activation_function": "act_fn", "attention_layers": "attention_types",
    }

    def __post_init__(self) -> None:
        if self.d_mlp is None:
            object.__setattr__(self, "d_mlp", 4 * self.d_model)  # frozen dataclass: set once, here
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn={self.act_fn!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
        if len(self.attention_types) != self.n_layers or not set(self.attention_types) <= {"global", "local"}:
            raise ValueError(f"attention_types must name 'global' or 'local' for each of the {self.n_layers} "
                             f"layers, got {self.attention_types!r}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def windows(self) -> tuple[int, ...]:
        """How many positions back each layer's queries see (themselves included)."""
        return tuple(self.window_size if t == "local" else self.n_ctx for t in self.attention_types)


class Attention(nn.Module):
    """Causal multi-head self-attention, unscaled; global or local only through the mask it is given."""

    def __init__(self, cfg: GPTNeoConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads = layer, cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # HF: attn.attention.q_proj
        self.k = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # HF: attn.attention.k_proj
        self.v = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # HF: attn.attention.v_proj
        self.out = nn.Linear(cfg.d_model, cfg.d_model)  # HF: attn.attention.out_proj
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
            q, k, v = (split_heads(lin(x), self.n_heads) for lin in (self.q, self.k, self.v))
        q = self.hook_q(q)  # batch pos head d_head
        k = self.hook_k(k)
        v = self.hook_v(v)
        if cache is not None:  # generation: attend to the cached prefix too; hooks saw only the new positions
            k, v = cache.update(self.layer, k, v)
        # z = softmax(q k^T + mask) v, per head, the mask also hiding keys outside this layer's window.
        # No 1/sqrt(d_head): GPT-Neo was trained unscaled. Scores, pattern and mix run in float32 (a no-op for
        # float32 weights), as `transformers` upcasts q and k; hooks on scores and pattern see float32.
        z = attend(q.float(), k.float(), v.float(), mask, causal=True, scale=1.0,
                   hook_scores=self.hook_attn_scores, hook_pattern=self.hook_pattern)
        z = self.hook_z(z.to(v.dtype))  # batch pos head d_head: each head's mix of values, before `out`
        if self.use_attn_result:  # each head's output in d_model, then their sum: head x the memory
            return self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O)).sum(2) + self.b_O
        return self.out(merge_heads(z))

    # TransformerLens's weight layout, as views of the (out, in) Linear weights: an edit through them reaches the
    # model. The checkpoint has no q/k/v biases: b_Q, b_K, b_V are zeros until weight processing creates them.
    def _heads_in(self, lin: nn.Linear) -> Float[Tensor, "head d_model d_head"]:
        return lin.weight.view(self.n_heads, -1, lin.weight.shape[1]).transpose(1, 2)

    def _head_bias(self, lin: nn.Linear) -> Float[Tensor, "head d_head"]:
        return (lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])).view(self.n_heads, -1)

    W_Q, W_K, W_V = (property(lambda self, n=n: self._heads_in(getattr(self, n))) for n in "qkv")
    b_Q, b_K, b_V = (property(lambda self, n=n: self._head_bias(getattr(self, n))) for n in "qkv")
    W_O = property(lambda self: self.out.weight.T.view(self.n_heads, -1, self.out.weight.shape[0]))
    b_O = property(lambda self: self.out.bias)

    def add_missing_biases(self) -> None:
        """Give q, k, v zero biases, so that weight processing (fold_ln) can write into b_Q, b_K, b_V."""
        for lin in (self.q, self.k, self.v):
            if lin.bias is None:
                lin.bias = nn.Parameter(lin.weight.new_zeros(lin.weight.shape[0]))


class MLP(nn.Module):
    def __init__(self, cfg: GPTNeoConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_mlp)  # HF: mlp.c_fc (an nn.Linear here, unlike GPT-2's Conv1D)
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model)  # HF: mlp.c_proj
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(self.fc(x))  # batch pos d_mlp
        post = self.hook_post(self.act(pre))
        return self.proj(post)

    # TransformerLens's names: views of the (out, in) Linear weights, transposed to (in, out)
    W_in, b_in = property(lambda self: self.fc.weight.T), property(lambda self: self.fc.bias)
    W_out, b_out = property(lambda self: self.proj.weight.T), property(lambda self: self.proj.bias)


class Block(nn.Module):
    def __init__(self, cfg: GPTNeoConfig, layer: int) -> None:
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


class GPTNeo(HookedModel):
    """GPT-Neo without the LM head: returns `ModelOutput.last_hidden_state` (after the final LayerNorm)."""

    can_resume = True  # forward(start_at_layer=, stop_at_layer=): sweeps resume mid-model

    def __init__(self, cfg: GPTNeoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.windows = cfg.windows  # per layer; global layers see the whole context
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
        passes `position_ids` explicitly. The local window counts key slots, padding included, as HF does.
        `start_at_layer` / `stop_at_layer` resume at / stop before a block, as in GPT2.forward."""
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
        # One additive mask per distinct window (attention runs in float32, so the mask is float32 too).
        masks = {w: sliding_causal_mask(attention_mask, n_pos, past + n_pos, w, torch.float32,
                                        inputs_embeds.device) for w in set(self.windows)}
        x = inputs_embeds
        if start_at_layer is None:
            x = self.hook_embed(x) + self.hook_pos_embed(self.pos_embed(position_ids))
        for block, window in list(zip(self.blocks, self.windows))[blocks]:
            x = block(x, masks[window], cache)
        if stop_at_layer is not None:
            return ModelOutput(last_hidden_state=x, past_key_values=cache)
        return ModelOutput(last_hidden_state=self.ln_final(x), past_key_values=cache)


class GPTNeoLM(CausalLM, GPTNeo):
    """GPT-Neo with its unembedding (tied to the token embedding unless the config says otherwise): also
    returns `logits`, and `loss` when `labels` are given."""


# -- HuggingFace attribute names ----------------------------------------------------------------------------------
# Code written for `transformers` reaches into the model by HF's names (`tinystory.transformer.wte(...)`,
# `config.num_layers`): these aliases answer to them. Hook names do not change.
GPTNeo.config, GPTNeo.wte, GPTNeo.wpe = alias("cfg"), alias("embed"), alias("pos_embed")
GPTNeo.h, GPTNeo.ln_f = alias("blocks"), alias("ln_final")
GPTNeo.transformer = property(lambda self: self, doc="HuggingFace's `model.transformer`: the model itself.")
GPTNeoLM.lm_head = alias("unembed")
# Inside the blocks: `h[i].ln_1`, `h[i].attn.attention.q_proj`, `h[i].mlp.c_fc`, ...
Block.ln_1, Block.ln_2 = alias("ln1"), alias("ln2")
Attention.attention = property(lambda self: self, doc="HuggingFace's `attn.attention`: the attention itself.")
Attention.q_proj, Attention.k_proj, Attention.v_proj, Attention.out_proj = alias("q"), alias("k"), alias("v"), \
    alias("out")
Attention.num_heads = alias("n_heads")
Attention.head_dim = property(lambda self: self.out.weight.shape[0] // self.n_heads, doc="d_head.")
Attention.attn_dropout, Attention.resid_dropout = identity_alias("attn_dropout"), identity_alias("resid_dropout")
MLP.c_fc, MLP.c_proj, MLP.dropout = alias("fc"), alias("proj"), identity_alias("dropout")
# `outputs.hidden_states` / `outputs.attentions` (see HookedModel.__call__)
GPTNeo.hidden_state_hooks, GPTNeo.attention_hook = ("blocks.{i}.hook_resid_pre", "ln_final.hook_normalized"), \
    "blocks.{i}.attn.hook_pattern"
