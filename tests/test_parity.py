"""Parity with `transformers` / `torch.nn.GRU` on REAL parameters: every tensor redrawn, biases and norms included.

Why redraw: `transformers`' default initialisation sets every bias to 0 and every LayerNorm to the identity
(weight 1, bias 0), and gives logits a spread of about 0.1. On such a model a loading rule that puts a tensor
in the wrong place is invisible whenever the two tensors hold the same value: swapping GPT-2's attention and
MLP `c_proj` biases (both zero), or `ln_1` and `ln_2` (both the identity), passes every default-init parity
test. `redraw_` replaces every parameter (weights, biases, norm weights and biases, embeddings, T5's relative
position tables, an untied `lm_head`) with seeded draws whose mean and scale differ per tensor, so that no two
tensors are alike, while keeping activations O(1) (weights scaled by fan_in**-0.5, norm weights around 1) so
that nothing saturates and the comparisons mean something.

Each test compares logits (or the last hidden state), every layer's residual stream and every attention
pattern over real (non-padding) query positions, through hooks (`run_with_cache`: explicit attention) and a
plain forward (fused attention), for models taken from memory and from a saved checkpoint, in float32 and in
float64. It also checks that each reference tensor has a spread above SPREAD, so no tolerance passes vacuously.
"""

import pytest
import torch
from torch import nn

import hookvene as pv
from tests.helpers import save_checkpoint, tiny_gpt2

# dtype -> (absolute, relative) tolerance. float32: both sides compute the same O(1..10) activations through a few
# dozen ops whose summation order differs (fused qkv vs split, SDPA vs explicit softmax); measured max errors are
# <= 2.5e-6 on hidden states and patterns, and up to 1.2e-5 on logits of a tied unembedding (|logit| up to ~20,
# hence the relative part, used for logits only). Read through every hook, each LayerNorm is spelled out (so that
# `hook_scale` can be read), which rounds ~1 ulp away from the fused kernel HF uses; through a few blocks that is up
# to ~2.2e-5 on logits, hence 4e-5 absolute. float64: the same computations agree to ~1e-14, so 1e-10 still leaves
# a wide margin. A misplaced tensor changes the compared values by ~0.1 or more.
TOL = {torch.float32: (4e-5, 1e-5), torch.float64: (1e-10, 1e-10)}
SPREAD = 0.1  # minimal spread of each reference tensor: its std, for attention patterns `pattern_spread`
SETUPS = {  # name: (load from a saved checkpoint directory, dtype)
    "memory": (False, torch.float32),
    "disk": (True, torch.float32),
    "float64": (False, torch.float64),
}


# --- redrawing parameters -------------------------------------------------------------------------------------


def _fan_in(module: nn.Module, p: torch.Tensor) -> int | None:
    """The input width a weight matrix multiplies (None for embedding tables, which are looked up)."""
    if isinstance(module, nn.Embedding):
        return None
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 Conv1D stores (in, out)
        return p.shape[0]
    return p.shape[1]  # nn.Linear and nn.GRU store (out, in)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def redraw_(model: nn.Module, seed: int) -> nn.Module:
    """Redraw every parameter of `model` in place (tied ones once): normal draws with a per-tensor random mean
    offset and scale. Matrices: std (0.6..1.4) * fan_in**-0.5, mean offset up to 0.2 std; embedding tables:
    std 0.3..0.6 (so that a tied unembedding gives logits of a few units); norm weights: mean 0.8..1.2, std
    0.1..0.3; biases and norm biases: mean -0.3..0.3, std 0.1..0.4."""
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if _is_norm(module) and name == "weight":
                    mean, std = u(0.8, 1.2), u(0.1, 0.3)
                elif p.dim() == 1:  # biases, norm biases
                    mean, std = u(-0.3, 0.3), u(0.1, 0.4)
                else:
                    fan_in = _fan_in(module, p)
                    std = u(0.6, 1.4) * fan_in**-0.5 if fan_in else u(0.3, 0.6)
                    mean = u(-0.2, 0.2) * std
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std + mean)
    return model


def test_redraw_leaves_no_default_and_no_two_equal_tensors():
    hf = redraw_(tiny_gpt2(n_layer=2, tie_word_embeddings=False), seed=0)
    params = dict(hf.named_parameters())
    assert all(p.std() > 0.05 for p in params.values())
    ln = hf.transformer.h[1].ln_2
    assert (ln.weight - 1).abs().mean() > 0.05 and ln.bias.abs().mean() > 0.05
    for a, pa in params.items():
        for b, pb in params.items():
            if a < b and pa.shape == pb.shape:
                assert (pa - pb).abs().mean() > 0.05, (a, b)


# --- comparing ------------------------------------------------------------------------------------------------


def pattern_spread(pattern: torch.Tensor) -> float:
    """How far attention rows are from uniform over the keys they see: the std of p * n_keys over those keys
    (0 for uniform rows, which would hide wrong queries and keys; masked zeros do not count)."""
    seen = pattern > 0
    return (pattern * seen.sum(-1, keepdim=True))[seen].std().item()


class Comparison:
    """Collects the max abs error of each hookvene tensor against its reference; `check` fails naming every one
    beyond tolerance, so a failure shows where a wrong tensor first surfaces."""

    def __init__(self, label: str, dtype: torch.dtype) -> None:
        self.label, self.dtype, self.errors, self.bad = label, dtype, {}, []

    def __call__(self, name: str, ours: torch.Tensor, theirs: torch.Tensor, rows: torch.Tensor | None = None,
                 logits: bool = False) -> None:
        """`rows` (batch, pos) bool selects real query positions; patterns are (batch, head, q, k)."""
        assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
        assert ours.dtype == theirs.dtype == self.dtype, (name, ours.dtype, theirs.dtype)
        pattern = ours.dim() == 4
        if pattern:  # put the query axis next to batch
            ours, theirs = ours.transpose(1, 2), theirs.transpose(1, 2)
        if rows is not None:
            ours, theirs = ours[rows], theirs[rows]
        assert torch.isfinite(theirs).all() and torch.isfinite(ours).all(), name
        spread = pattern_spread(theirs) if pattern else theirs.std().item()
        assert spread > SPREAD, f"{self.label} {name}: reference spread {spread:.3f} <= {SPREAD}"
        atol, rtol = TOL[self.dtype]
        diff = (ours - theirs).abs()
        self.errors[name] = diff.max().item()
        if (diff > atol + (rtol if logits else 0.0) * theirs.abs()).any():
            self.bad.append(name)

    def check(self) -> None:
        worst = max(self.errors, key=self.errors.get)
        print(f"\n{self.label}: max abs error {self.errors[worst]:.1e} ({worst})")
        assert not self.bad, f"{self.label}: beyond tolerance: " + ", ".join(
            f"{n}={self.errors[n]:.1e}" for n in self.bad)


def load(hf: nn.Module, setup: str, tmp_path, lm_head: bool) -> tuple[nn.Module, nn.Module]:
    """(reference, hookvene model) for `setup`: from the object itself (shared weights) or a saved checkpoint."""
    from_disk, dtype = SETUPS[setup]
    hf = hf.to(dtype)
    if from_disk:
        return hf, pv.from_pretrained(save_checkpoint(hf, None, str(tmp_path / "ckpt")), lm_head=lm_head)
    return hf, pv.from_pretrained(hf, lm_head=lm_head)


def left_padded(vocab: int, batch: int = 3, pos: int = 14, seed: int = 1):
    """ids, attention mask (rows of length pos, pos - 4, pos - 8, left-padded) and matching position ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, pos), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, : 4 * b] = 0
    return ids.masked_fill(mask == 0, 0), mask, (mask.cumsum(-1) - 1).clamp(min=0)


def compare_decoder_only(hf: nn.Module, model: nn.Module, vocab: int, label: str) -> None:
    """GPT-2 / GPT-Neo: logits (or last hidden state), every residual stream, every pattern, left padding."""
    ids, mask, pos = left_padded(vocab)
    rows = mask.bool()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, output_attentions=True)
        out, cache = model.run_with_cache(ids, attention_mask=mask, position_ids=pos)
        fused = model(ids, attention_mask=mask, position_ids=pos)  # no pattern hook: the fused (SDPA) path
    cmp = Comparison(label, next(hf.parameters()).dtype)
    final = "logits" if hasattr(ref, "logits") else "last_hidden_state"
    cmp(final, getattr(out, final), getattr(ref, final), rows, logits=True)
    cmp(f"{final} (fused attention)", getattr(fused, final), getattr(ref, final), rows, logits=True)
    n = len(ref.attentions)  # HF hidden states: the input of each block, then the final LayerNorm's output
    for i in range(n):
        cmp(f"blocks.{i}.hook_resid_pre", cache[f"blocks.{i}.hook_resid_pre"], ref.hidden_states[i], rows)
        cmp(f"blocks.{i}.attn.hook_pattern", cache[f"blocks.{i}.attn.hook_pattern"], ref.attentions[i], rows)
    cmp("ln_final.hook_normalized", cache["ln_final.hook_normalized"], ref.hidden_states[n], rows)
    cmp("last_hidden_state", out.last_hidden_state, ref.hidden_states[n], rows)
    cmp.check()


# --- GPT-2 ----------------------------------------------------------------------------------------------------

GPT2_VOCAB = 101
GPT2_CASES = {  # name: (tiny_gpt2 overrides, use the bare GPT2Model, hookvene lm_head)
    "lm-tied": (dict(), False, True),
    "lm-untied": (dict(tie_word_embeddings=False), False, True),
    "lm-loaded-headless": (dict(), False, False),
    "base": (dict(), True, False),
}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("case", list(GPT2_CASES))
def test_gpt2(case, setup, tmp_path):
    overrides, bare, lm_head = GPT2_CASES[case]
    hf = tiny_gpt2(n_embd=48, n_layer=3, n_head=4, n_inner=80, vocab_size=GPT2_VOCAB, **overrides)
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == hf.config.tie_word_embeddings
    redraw_(hf, seed=10 + len(case))
    hf, model = load(hf.transformer if bare else hf, setup, tmp_path, lm_head)
    if not lm_head:  # compare against the HF stack without its head
        hf = hf if bare else hf.transformer
    compare_decoder_only(hf, model, GPT2_VOCAB, f"gpt2 {case} {setup}")


# --- GPT-Neo --------------------------------------------------------------------------------------------------

NEO_VOCAB, NEO_WINDOW = 97, 4  # the 14-token inputs are longer than the local window
NEO_CASES = {  # name: (HF class, tie_word_embeddings)
    "lm-tied": ("GPTNeoForCausalLM", True),
    "lm-untied": ("GPTNeoForCausalLM", False),
    "base": ("GPTNeoModel", True),
}


def tiny_neo(cls_name: str, tied: bool):
    """Layers global, local, local."""
    import transformers

    config = transformers.GPTNeoConfig(
        vocab_size=NEO_VOCAB, max_position_embeddings=32, hidden_size=48, num_layers=3, num_heads=4,
        intermediate_size=72, attention_types=[[["global", "local"], 1], [["local"], 1]], window_size=NEO_WINDOW,
        resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=tied, attn_implementation="eager")
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).eval()


# No float64 setup: `transformers` computes GPT-Neo's attention scores in float32 whatever the weights' dtype.
@pytest.mark.parametrize("setup", ["memory", "disk"])
@pytest.mark.parametrize("case", list(NEO_CASES))
def test_gpt_neo(case, setup, tmp_path):
    cls_name, tied = NEO_CASES[case]
    lm_head = cls_name == "GPTNeoForCausalLM"
    hf, model = load(redraw_(tiny_neo(cls_name, tied), seed=20 + len(case)), setup, tmp_path, lm_head)
    assert model.cfg.attention_types == ("global", "local", "local")
    compare_decoder_only(hf, model, NEO_VOCAB, f"gpt-neo {case} {setup}")


# --- T5 -------------------------------------------------------------------------------------------------------

T5_VOCAB, D_KV, ENC_LEN, DEC_LEN = 61, 12, 20, 11  # ENC_LEN > max_distance (16): logarithmic buckets are used
T5_CASES = {  # name: (HF class, feed_forward_proj, untied lm_head)
    "t5-relu": ("T5ForConditionalGeneration", "relu", False),
    "flan-gated-gelu": ("T5ForConditionalGeneration", "gated-gelu", True),
    "t5-relu-base": ("T5Model", "relu", False),
}


def tiny_t5(cls_name: str, feed_forward_proj: str, untied: bool, seed: int):
    """Redrawn; n_heads * d_kv (36) != d_model (48), 2 encoder vs 3 decoder layers."""
    import transformers

    config = transformers.T5Config(
        vocab_size=T5_VOCAB, d_model=48, d_kv=D_KV, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj=feed_forward_proj, tie_word_embeddings=not untied, decoder_start_token_id=0,
        pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(config).eval()
    if untied:  # transformers 5 ties lm_head to `shared` whatever the config says; FLAN-T5 checkpoints do not
        hf.lm_head.weight = nn.Parameter(torch.empty(T5_VOCAB, 48))
    redraw_(hf, seed)
    with torch.no_grad():  # T5 does not scale scores by d_kv**-0.5 but folds it into q, as its own init does
        for name, p in hf.named_parameters():
            if name.endswith(".q.weight"):
                p.mul_(D_KV**-0.5)  # without it attention is so peaked that fp32 rounding reaches 4e-5
    return hf


def t5_batch(seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, T5_VOCAB, (3, ENC_LEN), generator=g)
    y = torch.randint(1, T5_VOCAB, (3, DEC_LEN), generator=g)
    enc_mask, dec_mask = torch.ones_like(x), torch.ones_like(y)
    enc_mask[1, 14:] = 0  # right padding
    enc_mask[2, :5] = 0  # left padding
    dec_mask[1, 8:] = 0  # a right-padded decoder row
    return dict(input_ids=x.masked_fill(enc_mask == 0, 0), attention_mask=enc_mask,
                decoder_input_ids=y.masked_fill(dec_mask == 0, 0), decoder_attention_mask=dec_mask)


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("case", list(T5_CASES))
def test_t5(case, setup, tmp_path):
    cls_name, ffn, untied = T5_CASES[case]
    lm_head = cls_name == "T5ForConditionalGeneration"
    hf, model = load(tiny_t5(cls_name, ffn, untied, seed=30 + len(case)), setup, tmp_path, lm_head)
    if lm_head:
        assert (model.unembed.weight is model.shared.weight) == (not untied)
    batch = t5_batch()
    enc_rows, dec_rows = batch["attention_mask"].bool(), batch["decoder_attention_mask"].bool()
    with torch.no_grad():
        ref = hf(**batch, output_hidden_states=True, output_attentions=True)
        out, cache = model.run_with_cache(**batch)
        fused = model(**batch)
    cmp = Comparison(f"t5 {case} {setup}", SETUPS[setup][1])
    final = "logits" if lm_head else "last_hidden_state"
    cmp(final, getattr(out, final), getattr(ref, final), dec_rows, logits=True)
    cmp(f"{final} (fused attention)", getattr(fused, final), getattr(ref, final), dec_rows, logits=True)
    cmp("encoder_last_hidden_state", out.encoder_last_hidden_state, ref.encoder_last_hidden_state, enc_rows)
    # HF hidden states: the input of each block, then the stack's final norm output
    for stack, hidden, rows in (("encoder", ref.encoder_hidden_states, enc_rows),
                                ("decoder", ref.decoder_hidden_states, dec_rows)):
        n = len(hidden) - 1
        for i in range(n):
            cmp(f"{stack}.blocks.{i}.hook_resid_pre", cache[f"{stack}.blocks.{i}.hook_resid_pre"], hidden[i], rows)
        cmp(f"{stack}.ln_final.hook_normalized", cache[f"{stack}.ln_final.hook_normalized"], hidden[n], rows)
    for fmt, patterns, rows in (("encoder.blocks.{}.attn", ref.encoder_attentions, enc_rows),
                                ("decoder.blocks.{}.attn", ref.decoder_attentions, dec_rows),
                                ("decoder.blocks.{}.cross_attn", ref.cross_attentions, dec_rows)):
        for i, theirs in enumerate(patterns):
            name = fmt.format(i) + ".hook_pattern"
            cmp(name, cache[name], theirs, rows)
    cmp.check()


# --- GRU ------------------------------------------------------------------------------------------------------

GRU_D_IN, GRU_H, GRU_LAYERS, GRU_T = 5, 16, 3, 9
GRU_SETUPS = {"module": torch.float32, "state_dict": torch.float32, "float64": torch.float64}


@pytest.mark.parametrize("setup", list(GRU_SETUPS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_gru(batch_first, setup):
    dtype = GRU_SETUPS[setup]
    torch.manual_seed(0)
    ref = redraw_(nn.GRU(GRU_D_IN, GRU_H, num_layers=GRU_LAYERS, batch_first=batch_first), seed=40)
    ref = ref.to(dtype).eval()
    model = pv.from_torch_gru({k: v.clone() for k, v in ref.state_dict().items()} if setup == "state_dict" else ref)
    x = torch.randn(4, GRU_T, GRU_D_IN, generator=torch.Generator().manual_seed(3), dtype=dtype)
    with torch.no_grad():
        want, want_h = ref(x if batch_first else x.transpose(0, 1))
        out, cache = model.run_with_cache(inputs_embeds=x, names_filter=lambda n: n.endswith("hook_hidden"))
    cmp = Comparison(f"gru batch_first={batch_first} {setup}", dtype)
    cmp("last_hidden_state", out.last_hidden_state, want if batch_first else want.transpose(0, 1))
    for layer in range(GRU_LAYERS):  # each layer's final state is nn.GRU's h_n[layer]
        cmp(f"layers.{layer}.hook_hidden[-1]", cache[f"layers.{layer}.hook_hidden"][:, -1], want_h[layer])
    cmp.check()
