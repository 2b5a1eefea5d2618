"""TransformerLens's model-level API, shared by every hookvene model (`HookedModel` inherits `LensModel`).

Same names and semantics as TL 3.x's `HookedTransformer`, so TL code and teaching material carry over:

    tokenizer   to_tokens, to_str_tokens, to_string, to_single_token, get_token_position; the model, run_with_cache,
                run_with_hooks and generate accept a string or a list of strings
    forward     return_type= "logits" | "loss" | "both" | None, loss_per_token= (default: hookvene's ModelOutput)
    weights     W_E, W_pos, W_U, b_U, W_Q/W_K/W_V (layer head d_model d_head), W_O (layer head d_head d_model), b_*,
                W_in/W_out/b_in/b_out (W_gate: gated MLPs), QK / OV as FactoredMatrix, tokens_to_residual_directions,
                accumulated_bias: GPT-2, GPT-Neo, GPT-NeoX, Llama / Mistral / Qwen2 (T5: W_E, W_U here, and per
                layer the views on each attention and MLP module, e.g. `model.decoder.blocks[l].cross_attn.W_Q`)
    flags       set_use_attn_result, set_use_split_qkv_input, set_use_attn_in, set_use_hook_mlp_in
    processing  process_weights(fold_ln=, center_writing_weights=, center_unembed=, fold_value_biases=,
                refactor_factored_attn_matrices=), as `from_pretrained(..., fold_ln=True, ...)` applies it (GPT-2,
                GPT-Neo)

What each architecture supplies: `blocks[l].attn` exposes per-layer views W_Q, W_K, W_V (head d_model d_head), W_O
(head d_head d_model) and b_Q, b_K, b_V (head d_head), b_O (d_model); `blocks[l].mlp` exposes W_in, W_out, b_in,
b_out (a gated MLP also W_gate: hook_pre = x @ W_gate, hook_pre_linear = x @ W_in + b_in, as TL's GatedMLP). They
are views of the parameters where the layout allows (an edit through them is seen by the model); the model-level
stacks here are copies, as in TL. A grouped-query model (Llama / Mistral / Qwen2 with n_kv_heads < n_heads) follows
TL 3.x's GroupedQueryAttention: `attn._W_K` / `_W_V` / `_b_K` / `_b_V` are per key/value head (views), and W_K / W_V /
b_K / b_V repeat each for the query heads of its group (copies), so QK and OV stay (layer, head, ...). On rotary
models q and k are hooked and weighed before the rotation: x @ W_Q + b_Q is `hook_q`, not `hook_rot_q`.
"""

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from hookvene.factored_matrix import FactoredMatrix, composition_score
from hookvene.hooks import HookedModule
from hookvene.utils import warn_unknown_tokens

Text = str | Sequence[str]
RETURN_TYPES = ("logits", "loss", "both", None)
_OUTPUT = object()  # return_type not given: hookvene's ModelOutput


def is_text(x: Any) -> bool:
    return isinstance(x, str) or (isinstance(x, list | tuple) and len(x) > 0 and all(isinstance(s, str) for s in x))


def lm_cross_entropy(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"],
                     attention_mask: Int[Tensor, "batch pos"] | None = None,
                     per_token: bool = False) -> Tensor:
    """TransformerLens's next-token loss: -log p(token[i + 1] | ..i); padded targets (mask 0) are left out.
    `per_token` gives (batch, pos - 1), else the mean over real targets."""
    logprobs = logits[:, :-1].float().log_softmax(-1)
    loss = -logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    if attention_mask is None:
        return loss if per_token else loss.mean()
    real = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    loss = loss * real
    return loss if per_token else loss.sum() / real.sum()


class LensModel(HookedModule):
    """TransformerLens's `HookedTransformer` API on top of a hooked model (module docstring)."""

    tokenizer: Any = None  # set by `from_pretrained` from the checkpoint directory, or assign your own
    default_prepend_bos: bool = True

    @property
    def normalization_type(self) -> str | None:
        """TransformerLens's `normalization_type`: "LN" (GPT-2, GPT-Neo, GPT-NeoX), "RMS" (Llama, T5), None (GRU,
        MLP), from the config class's `tl_cfg`; "LNPre" once `fold_ln` has folded the LayerNorm weights away."""
        own = self.__dict__.get("_normalization_type")
        if own is not None:
            return own
        cfg = self.__dict__.get("_config")
        return getattr(type(cfg), "tl_cfg", {}).get("normalization_type", "LN") if cfg is not None else "LN"

    @normalization_type.setter
    def normalization_type(self, value: str | None) -> None:
        self.__dict__["_normalization_type"] = value

    # -- tokenizer ---------------------------------------------------------------------------------------------
    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(f"this {type(self).__name__} has no tokenizer: load it from a checkpoint directory that "
                             f"has tokenizer files (`hookvene.from_pretrained(path)`), or set `model.tokenizer = "
                             f"AutoTokenizer.from_pretrained(...)`; token ids work without one")
        return self.tokenizer

    def tokens_and_mask(self, input: Text, prepend_bos: bool | None = None, padding_side: str | None = None,
                        truncate: bool = True) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Token ids (batch, pos) and the padding mask (1 = real token) of one text or a list of texts.

        Decoder-only models: the text is tokenised without the tokenizer's own special tokens, then BOS is
        prepended (`prepend_bos`, default True, as TL), so the result does not depend on whether a tokenizer's
        template adds BOS itself. Encoder-decoder models (T5) keep the tokenizer's special tokens (T5's `</s>`).
        Rows are padded on `padding_side` ("right" or "left"; default the tokenizer's) with its pad token."""
        tok = self._tokenizer()
        texts = [input] if isinstance(input, str) else list(input)
        side = padding_side or getattr(tok, "padding_side", "right")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        enc_dec = getattr(self, "is_encoder_decoder", False)
        prepend = (self.default_prepend_bos and not enc_dec) if prepend_bos is None else prepend_bos
        rows = [list(tok(t, add_special_tokens=enc_dec)["input_ids"]) for t in texts]
        warn_unknown_tokens(tok, torch.tensor([i for r in rows for i in r], dtype=torch.long), "the text")
        if prepend:
            bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if bos is None:
                raise ValueError("prepend_bos=True but the tokenizer has no BOS (or EOS) token; pass prepend_bos=False")
            rows = [[bos] + r for r in rows]
        n_ctx = getattr(getattr(self, "cfg", None), "n_ctx", None)
        if truncate and n_ctx:
            rows = [r[:n_ctx] for r in rows]
        width = max(len(r) for r in rows)
        pad = next(p for p in (tok.pad_token_id, tok.eos_token_id, 0) if p is not None)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            at = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, at], mask[i, at] = torch.tensor(r, dtype=torch.long), 1
        device = self.device
        return ids.to(device), mask.to(device)

    def to_tokens(self, input: Text, prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> Int[Tensor, "batch pos"]:
        """Token ids (batch, pos) of a text or a list of texts (see `tokens_and_mask`)."""
        ids = self.tokens_and_mask(input, prepend_bos, padding_side, truncate)[0]
        return ids if move_to_device else ids.cpu()

    def to_string(self, tokens: Int[Tensor, "... pos"] | Sequence[int] | int) -> str | list[str]:
        """Decode token ids: one sequence -> a string, a batch (batch, pos) -> a list of strings."""
        tok = self._tokenizer()
        t = torch.as_tensor(tokens)
        if t.ndim <= 1:
            return tok.decode(t.reshape(-1).tolist(), clean_up_tokenization_spaces=False)
        return [tok.decode(row.tolist(), clean_up_tokenization_spaces=False) for row in t]

    def to_str_tokens(self, input: Text | Tensor | Sequence[int], prepend_bos: bool | None = None,
                      padding_side: str | None = None) -> list[str] | list[list[str]]:
        """Each token as a string: a text or a sequence of ids -> a list; a list of texts -> a list of lists."""
        if isinstance(input, list | tuple) and input and isinstance(input[0], str):
            return [self.to_str_tokens(t, prepend_bos, padding_side) for t in input]
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos, padding_side)[0]
        else:
            ids = torch.as_tensor(input)
            if ids.ndim == 2:
                if ids.shape[0] != 1:
                    raise ValueError(f"to_str_tokens takes one sequence, got a batch of shape {tuple(ids.shape)}")
                ids = ids[0]
            ids = ids.reshape(-1)
        tok = self._tokenizer()
        return [tok.decode([int(i)], clean_up_tokenization_spaces=False) for i in ids]

    def to_single_token(self, string: str) -> int:
        """The id of a text that is exactly one token (no BOS); an error naming the pieces otherwise."""
        ids = self.to_tokens(string, prepend_bos=False)[0]
        if len(ids) != 1:
            pieces = self.to_str_tokens(ids)
            raise ValueError(f"{string!r} is {len(ids)} tokens for this tokenizer, not one: {pieces}")
        tok = self._tokenizer()
        if getattr(tok, "unk_token_id", None) is not None and int(ids[0]) == tok.unk_token_id \
                and string != tok.unk_token:
            raise ValueError(f"{string!r} is not in this tokenizer's vocabulary (it encodes to the unknown token)")
        return int(ids[0])

    def to_single_str_token(self, int_token: int) -> str:
        return self.to_str_tokens([int_token])[0]

    def get_token_position(self, single_token: str | int, input: str | Tensor, mode: str = "first",
                           prepend_bos: bool | None = None, padding_side: str | None = None) -> int:
        """The position of a token in one sequence (a text or ids), its first or last occurrence (`mode`)."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        ids = self.to_tokens(input, prepend_bos, padding_side) if isinstance(input, str) else torch.as_tensor(input)
        if ids.ndim == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"get_token_position takes one sequence, got a batch of shape {tuple(ids.shape)}")
            ids = ids[0]
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        where = (ids == token).nonzero().flatten()
        if not len(where):
            raise ValueError(f"token {single_token!r} (id {token}) is not in the input {self.to_str_tokens(ids)}")
        return int(where[0] if mode == "first" else where[-1])

    # -- forward: text in, TransformerLens's return types out ----------------------------------------------------
    def __call__(self, *args: Any, return_type: Any = _OUTPUT, loss_per_token: bool = False,
                 prepend_bos: bool | None = None, padding_side: str | None = None, **kwargs: Any) -> Any:
        """The model's forward, also taking a string or a list of strings (tokenised with `tokens_and_mask`; a
        left-padded batch gets position ids counted from each row's first real token, as in TL, so a padded row
        equals that row alone) and TL's `return_type` ("logits", "loss", "both", None) and `loss_per_token`.
        Without `return_type` it returns hookvene's `ModelOutput`. Token tensors keep `transformers`'
        semantics: with an explicit `attention_mask`, positions come from `position_ids` only."""
        if return_type is not _OUTPUT and return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
        key = "input_ids" if "input_ids" in kwargs else ("input" if "input" in kwargs else None)
        text = kwargs[key] if key else (args[0] if args else None)
        if is_text(text):
            ids, mask = self.tokens_and_mask(text, prepend_bos, padding_side)
            args = args[1:] if key is None else args
            kwargs.pop(key, None)
            kwargs["input_ids"] = ids
            if not bool(mask.all()):
                kwargs.setdefault("attention_mask", mask)
                if not getattr(self, "is_encoder_decoder", False):
                    kwargs.setdefault("position_ids", (mask.cumsum(-1) - 1).clamp(min=0))
        elif key == "input":  # TL's keyword for the tokens
            kwargs["input_ids"] = kwargs.pop("input")
        out = super().__call__(*args, **kwargs)
        if return_type is _OUTPUT:
            return out
        if return_type is None:
            return None
        if return_type == "logits":
            return out.logits
        loss = out.loss
        if loss is None or loss_per_token:
            tokens = kwargs.get("input_ids", args[0] if args else None)
            if getattr(self, "is_encoder_decoder", False) or tokens is None:
                raise ValueError("return_type='loss' needs the input tokens of a decoder-only model (or labels= for "
                                 "T5, whose loss is over its decoder targets)")
            loss = lm_cross_entropy(out.logits, tokens, kwargs.get("attention_mask"), loss_per_token)
        return loss if return_type == "loss" else (out.logits, loss)

    # -- weight views --------------------------------------------------------------------------------------------
    def _blocks(self, what: str) -> Any:
        blocks = getattr(self, "blocks", None)
        if blocks is None or not hasattr(blocks[0], "attn") or not hasattr(blocks[0].attn, "W_Q"):
            if getattr(self, "is_encoder_decoder", False):
                raise ValueError(f"{type(self).__name__} has no model-level {what}: TransformerLens's weight views are "
                                 f"implemented for the decoder-only transformers (GPT-2, GPT-Neo, GPT-NeoX, Llama / "
                                 f"Mistral / Qwen2) as stacks over layers; T5 has W_E and W_U here, and per layer "
                                 f"on each stack's modules: model.encoder.blocks[l].attn.W_Q (W_K, W_V, W_O), "
                                 f"model.decoder.blocks[l].cross_attn.W_Q, model.decoder.blocks[l].mlp.W_in "
                                 f"(W_out; gated: W_gate)")
            raise ValueError(f"{type(self).__name__} has no {what}: TransformerLens's weight views are implemented "
                             f"for the decoder-only transformers (GPT-2, GPT-Neo, GPT-NeoX, Llama / Mistral / "
                             f"Qwen2); T5 has W_E and W_U and per-layer views on its modules, the GRU and the MLP "
                             f"classifier none")
        return blocks

    def _stack(self, module: str, name: str) -> Tensor:
        blocks = self._blocks(name)
        if not hasattr(getattr(blocks[0], module), name):
            raise ValueError(f"{type(self).__name__} has no {name}: it is the gate of a gated MLP (Llama-family "
                             f"models); this model's MLP is not gated")
        return torch.stack([getattr(getattr(b, module), name) for b in blocks])

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        embed = getattr(self, "embed", None)
        embed = getattr(self, "shared", None) if embed is None else embed  # T5: one embedding for both stacks
        if not isinstance(embed, nn.Embedding):
            raise ValueError(f"{type(self).__name__} has no token embedding as TransformerLens's W_E (weight views "
                             f"are for the transformers: GPT-2, GPT-Neo, GPT-NeoX, Llama-family, T5)")
        return embed.weight

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        if not hasattr(self, "pos_embed"):
            raise ValueError(f"{type(self).__name__} has no learned position embedding (W_pos)")
        return self.pos_embed.weight

    @property
    def W_E_pos(self) -> Float[Tensor, "d_vocab_plus_n_ctx d_model"]:
        return torch.cat([self.W_E, self.W_pos])

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        if not getattr(self, "has_lm_head", False):
            raise ValueError(f"{type(self).__name__} has no LM head (W_U): load it with lm_head=True")
        if not isinstance(getattr(self, "unembed", None), nn.Linear):
            raise ValueError(f"{type(self).__name__} has no TransformerLens unembedding (W_U): weight views are for "
                             f"the transformers (GPT-2, GPT-Neo, GPT-NeoX, Llama-family, T5)")
        return self.unembed.weight.T

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        W_U = self.W_U
        bias = self.unembed.bias
        return bias if bias is not None else W_U.new_zeros(W_U.shape[1])

    W_Q = property(lambda self: self._stack("attn", "W_Q"), doc="(layer, head, d_model, d_head)")
    W_K = property(lambda self: self._stack("attn", "W_K"), doc="(layer, head, d_model, d_head)")
    W_V = property(lambda self: self._stack("attn", "W_V"), doc="(layer, head, d_model, d_head)")
    W_O = property(lambda self: self._stack("attn", "W_O"), doc="(layer, head, d_head, d_model)")
    b_Q = property(lambda self: self._stack("attn", "b_Q"), doc="(layer, head, d_head)")
    b_K = property(lambda self: self._stack("attn", "b_K"), doc="(layer, head, d_head)")
    b_V = property(lambda self: self._stack("attn", "b_V"), doc="(layer, head, d_head)")
    b_O = property(lambda self: self._stack("attn", "b_O"), doc="(layer, d_model)")
    W_in = property(lambda self: self._stack("mlp", "W_in"), doc="(layer, d_model, d_mlp)")
    W_gate = property(lambda self: self._stack("mlp", "W_gate"), doc="(layer, d_model, d_mlp): gated MLPs only")
    W_out = property(lambda self: self._stack("mlp", "W_out"), doc="(layer, d_mlp, d_model)")
    b_in = property(lambda self: self._stack("mlp", "b_in"), doc="(layer, d_mlp)")
    b_out = property(lambda self: self._stack("mlp", "b_out"), doc="(layer, d_model)")

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q W_K^T per (layer, head): (layer, head, d_model, d_model), factored (rank d_head)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """W_V W_O per (layer, head): (layer, head, d_model, d_model), factored (rank d_head)."""
        return FactoredMatrix(self.W_V, self.W_O)

    def all_composition_scores(self, mode: str) -> Float[Tensor, "layer1 head1 layer2 head2"]:
        """[l1, h1, l2, h2] = how much head l2.h2 reads head l1.h1's output through its queries ("Q"), keys ("K")
        or values ("V"): the composition score of OV[l1, h1] with QK[l2, h2] (Q), QK[l2, h2]^T (K) or OV[l2, h2]
        (V); 0 unless l1 < l2. TransformerLens's method (row-vector convention: a head's write y enters a later
        head's attention scores as x_q QK y^T through its key, y QK x_k^T through its query)."""
        if mode not in ("Q", "K", "V"):
            raise ValueError(f"mode must be one of 'Q', 'K', 'V' (which input of the later head reads the earlier "
                             f"head's output), got {mode!r}")
        OV = self.OV
        right = {"Q": self.QK, "K": self.QK.T, "V": OV}[mode]
        # (l1, h1, 1, 1) against (1, 1, l2, h2): every pair at once.
        scores = composition_score(OV.unsqueeze(2).unsqueeze(3), right.unsqueeze(0).unsqueeze(1))
        layers = torch.arange(scores.shape[0], device=scores.device)
        earlier = layers[:, None, None, None] < layers[None, None, :, None]
        return torch.where(earlier, scores, torch.zeros_like(scores))

    def tokens_to_residual_directions(self, tokens: str | int | Int[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
        """The unembedding direction of each token (a column of W_U): a token's logit is (final normalised residual)
        . direction + b_U[token]. A string must be one token."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        return self.W_U.T[torch.as_tensor(tokens, device=self.W_U.device)]

    def accumulated_bias(self, layer: int, mlp_input: bool = False,
                         include_mlp_biases: bool = True) -> Float[Tensor, " d_model"]:
        """The sum of the output biases written into the residual stream before block `layer` (attention and,
        with `include_mlp_biases`, MLP), plus block `layer`'s attention bias with `mlp_input`."""
        blocks = self._blocks("biases")
        total = torch.zeros_like(blocks[0].attn.b_O)
        for b in blocks[:layer]:
            total = total + b.attn.b_O + (b.mlp.b_out if include_mlp_biases else 0)
        if mlp_input:
            total = total + blocks[layer].attn.b_O
        return total

    # -- gated hooks (TransformerLens's cfg flags) ---------------------------------------------------------------
    def _set_flag(self, module: str, flag: str, value: bool) -> None:
        blocks = getattr(self, "blocks", None)
        targets = [b if module == "block" else getattr(b, module, None) for b in (blocks or [])]
        if not targets or not all(hasattr(type(t), flag) for t in targets):
            raise ValueError(f"{type(self).__name__} does not implement {flag} (it is for GPT-2 and GPT-Neo)")
        for t in targets:
            setattr(t, flag, bool(value))

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Fire `blocks.{l}.attn.hook_result`, each head's output in d_model (batch pos head d_model): costs
        n_heads x the attention output's memory, so it is off by default."""
        self._set_flag("attn", "use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Fire `hook_q_input` / `hook_k_input` / `hook_v_input` (batch pos head d_model): the residual stream
        copied per head before ln1, so a head's query, key or value input can be patched alone."""
        self._set_flag("block", "use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Fire `hook_attn_in` (batch pos head d_model): the attention input copied per head."""
        self._set_flag("block", "use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Fire `hook_mlp_in` (batch pos d_model): the MLP's input before ln2."""
        self._set_flag("block", "use_hook_mlp_in", use_hook_mlp_in)

    # -- weight processing ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def process_weights(self, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
                        fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False) -> None:
        """TransformerLens's weight processing, in place (`from_pretrained(..., fold_ln=True, ...)` calls it on a
        fresh copy of the weights). Each step leaves the log-probabilities unchanged; the logits change by a
        per-row constant (center_unembed) and the hooks after a LayerNorm change as documented in TL:

        fold_ln: each LayerNorm's weight and bias move into the layer that reads it (W_Q/W_K/W_V, W_in, W_U, with
            new biases), whose weights are then centred over d_model; the LayerNorms keep weight 1 and bias 0.
        center_writing_weights: whatever writes to the residual stream (W_E, W_pos, W_O, b_O, W_out, b_out) loses
            its mean over d_model, which every following LayerNorm removes anyway.
        center_unembed: W_U and b_U lose their mean over the vocabulary (softmax is shift-invariant).
        fold_value_biases: b_V moves into b_O (attention patterns sum to 1, so each head adds b_V W_O).
        refactor_factored_attn_matrices: W_Q, W_K (biases appended) and W_V, W_O are re-factored by SVD so that
            both QK factors carry half the spectrum and W_O has orthonormal rows; QK and OV are unchanged."""
        blocks = self._blocks("weights to process")
        if not (hasattr(self, "pos_embed") and hasattr(blocks[0], "use_split_qkv_input")):
            raise ValueError(f"weight processing (fold_ln, center_writing_weights, ...) is implemented for GPT-2 and "
                             f"GPT-Neo; {type(self).__name__} is not supported (its weight views work unprocessed)")
        if getattr(self, "has_lm_head", False) and self.unembed.weight is self.embed.weight:
            self.unembed.weight = nn.Parameter(self.embed.weight.detach().clone())  # untie: W_E and W_U change apart
        for module in [b.attn for b in blocks] + ([self.unembed] if getattr(self, "has_lm_head", False) else []):
            if hasattr(module, "add_missing_biases"):
                module.add_missing_biases()  # GPT-Neo's q/k/v: folding creates biases
        if getattr(self, "has_lm_head", False) and self.unembed.bias is None:
            self.unembed.bias = nn.Parameter(self.unembed.weight.new_zeros(self.unembed.weight.shape[0]))
        if fold_ln:
            for b in blocks:
                w, bias = b.ln1.weight.clone(), b.ln1.bias.clone()
                for W, B in ((b.attn.W_Q, b.attn.b_Q), (b.attn.W_K, b.attn.b_K), (b.attn.W_V, b.attn.b_V)):
                    B.copy_(B + torch.einsum("d,hde->he", bias, W))
                    folded = W * w[:, None]
                    W.copy_(folded - folded.mean(-2, keepdim=True))
                w2, bias2 = b.ln2.weight.clone(), b.ln2.bias.clone()
                b.mlp.b_in.copy_(b.mlp.b_in + bias2 @ b.mlp.W_in)
                folded = b.mlp.W_in * w2[:, None]
                b.mlp.W_in.copy_(folded - folded.mean(0, keepdim=True))
                for ln in (b.ln1, b.ln2):
                    ln.weight.fill_(1.0)
                    ln.bias.zero_()
            if getattr(self, "has_lm_head", False):
                w, bias = self.ln_final.weight.clone(), self.ln_final.bias.clone()
                self.unembed.bias.copy_(self.unembed.bias + bias @ self.W_U)
                folded = self.W_U * w[:, None]
                self.W_U.copy_(folded - folded.mean(0, keepdim=True))
                self.ln_final.weight.fill_(1.0)
                self.ln_final.bias.zero_()
            self.normalization_type = "LNPre"
        if center_writing_weights:
            for t in [self.W_E, self.W_pos] + [w for b in blocks for w in (b.attn.W_O, b.mlp.W_out)]:
                t.sub_(t.mean(-1, keepdim=True))
            for b in blocks:
                b.attn.b_O.sub_(b.attn.b_O.mean())
                b.mlp.b_out.sub_(b.mlp.b_out.mean())
        if center_unembed and getattr(self, "has_lm_head", False):
            self.W_U.sub_(self.W_U.mean(-1, keepdim=True))
            self.unembed.bias.sub_(self.unembed.bias.mean())
        if fold_value_biases or refactor_factored_attn_matrices:
            for b in blocks:
                b.attn.b_O.add_(torch.einsum("he,hed->d", b.attn.b_V, b.attn.W_O))
                b.attn.b_V.zero_()
        if refactor_factored_attn_matrices:
            for b in blocks:
                a = b.attn
                q = torch.cat([a.W_Q, a.b_Q[:, None]], dim=1)  # head (d_model + 1) d_head: the bias as an input
                k = torch.cat([a.W_K, a.b_K[:, None]], dim=1)
                qk = FactoredMatrix(q, k.transpose(-2, -1)).make_even()
                a.W_Q.copy_(qk.A[:, :-1])
                a.b_Q.copy_(qk.A[:, -1])
                a.W_K.copy_(qk.B.transpose(-2, -1)[:, :-1])
                a.b_K.copy_(qk.B.transpose(-2, -1)[:, -1])
                U, S, V = FactoredMatrix(a.W_V, a.W_O).svd()
                a.W_V.copy_(U * S[:, None, :])
                a.W_O.copy_(V.transpose(-2, -1))


__all__ = ["LensModel", "RETURN_TYPES", "is_text", "lm_cross_entropy"]
