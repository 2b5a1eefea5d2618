"""A stacked GRU (Cho et al. 2014) with its time loop in plain sight and a HookPoint on every gate.

Features of the architecture (the `torch.nn.GRU` equations, gate order r | z | n):
- per layer and step, `x2h(x_t)` and `h2h(h_{t-1})` each give 3 * d_hidden pre-activations, split r | z | n;
- reset r = σ(x_r + h_r), update z = σ(x_z + h_z), candidate n = tanh(x_n + r ⊙ h_n);
- new state h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}; h_0 = 0; layer l > 0 reads layer l - 1's h_t as its input;
- `forward` loops over time outside and layers inside, so a hook that edits `layers.{l}.hook_hidden` at step t
  changes everything computed after it: later steps of that layer and the layers above.

Hooks inside the loop receive the step (`hook.step`); see `hookvene/hooks.py`. Parameters are nn.GRU's
(`x2h` = weight_ih_l{l}, `h2h` = weight_hh_l{l}), so `hookvene/loading/gru.py` loads them by renaming.

Construction mirrors pyvene's GRU (`GRUConfig(h_dim=32)`, `create_gru_classifier`); differences: `d_in` may
differ from the hidden width `d_model` (pyvene: `h_dim`); `last_hidden_state` holds every step (pyvene's holds
the final step only); with `include_emb`, position embeddings are always added to token embeddings (pyvene
adds them only when given `position_ids`), while `inputs_embeds` reach layer 0 as given; `pdrop` is stored,
but nothing drops out.
"""

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int, Num
from torch import Tensor, nn

from hookvene.hooks import HookPoint
from hookvene.models.common import (
    LOSSES,
    HFAliases,
    HookedModel,
    ModelOutput,
    alias,
    check_tokens,
    lm_loss,
    runtime_flags,
)

PYVENE_NAMES = {"n_layers": "n_layer", "d_model": "h_dim"}


@runtime_flags
@dataclass(init=False)
class GRUConfig(HFAliases):
    """The GRU's sizes. Canonical names follow the other models (`n_layers`, `d_model` = the hidden width);
    pyvene's names work too, as keywords and attributes (`GRUConfig(h_dim=32, n_layer=2)`, `cfg.h_dim`), and
    positional arguments keep pyvene's order."""

    include_emb: bool  # token + position embeddings (wte, wpe) before layer 0
    vocab_size: int
    max_position_embeddings: int
    n_layers: int
    d_model: int  # hidden width
    n_labels: int
    include_bias: bool
    pdrop: float  # stored for pyvene compatibility; nothing drops out
    problem_type: str
    initializer_range: float  # std of the embeddings' normal init
    d_in: int  # width of layer 0's input (default: d_model)

    # TransformerLens's cfg names (see HFAliases in models/common.py)
    tl_cfg: ClassVar[dict[str, str | None]] = {"normalization_type": None, "positional_embedding_type": None,
                                               "eps": None}
    hf_aliases: ClassVar[dict[str, str]] = {
        "n_layer": "n_layers", "num_layers": "n_layers", "num_hidden_layers": "n_layers",
        "h_dim": "d_model", "hidden_size": "d_model", "d_hidden": "d_model", "input_size": "d_in",
        "num_labels": "n_labels", "d_vocab": "vocab_size",
    }

    def __init__(self, include_emb: bool = False, vocab_size: int = 50257, max_position_embeddings: int = 512,
                 n_layer: int | None = None, h_dim: int | None = None, n_labels: int = 2, include_bias: bool = True,
                 pdrop: float = 0.0, problem_type: str = "single_label_classification",
                 initializer_range: float = 0.02, d_in: int | None = None, *, n_layers: int | None = None,
                 d_model: int | None = None) -> None:
        if (n_layer is not None and n_layers is not None) or (h_dim is not None and d_model is not None):
            raise ValueError("pass n_layers or pyvene's n_layer, d_model or pyvene's h_dim, not both")
        self.include_emb, self.vocab_size = include_emb, vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.n_layers = n_layers if n_layers is not None else (n_layer if n_layer is not None else 2)
        self.d_model = d_model if d_model is not None else (h_dim if h_dim is not None else 512)
        self.n_labels, self.include_bias, self.pdrop = n_labels, include_bias, pdrop
        self.problem_type, self.initializer_range = problem_type, initializer_range
        self.d_in = self.d_model if d_in is None else d_in
        self.check()

    def check(self) -> None:
        for f in fields(self):  # also catches a hand-edited config.json ("h_dim": "32")
            value, want = getattr(self, f.name), (int, float) if f.type is float else f.type
            if not isinstance(value, want) or (isinstance(value, bool) and f.type is not bool):
                name = f.name + (f" (pyvene: {PYVENE_NAMES[f.name]})" if f.name in PYVENE_NAMES else "")
                raise ValueError(f"GRUConfig.{name} must be of type {f.type.__name__}, got {value!r}")
        small = [f"{n}={getattr(self, n)}" for n in ("vocab_size", "max_position_embeddings", "n_layers",
                                                      "d_model", "n_labels", "d_in") if getattr(self, n) < 1]
        if small:
            raise ValueError(f"GRUConfig fields must be positive: {', '.join(small)}")
        if self.problem_type not in LOSSES:
            raise ValueError(f"problem_type={self.problem_type!r} is not one of {sorted(LOSSES)}")

    def to_dict(self) -> dict[str, Any]:
        """pyvene's field names, so that a saved config.json reads as pyvene's does."""
        return {PYVENE_NAMES.get(k, k): v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GRUConfig":
        """From `to_dict()` output; files saved with pyvene's names (`h_dim`, `n_layer`) read too."""
        names = {f.name for f in fields(cls)} | {"n_layer", "h_dim"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GRUConfig fields {unknown}; valid: {[f.name for f in fields(cls)]}")
        return cls(**d)


class GRUCell(nn.Module):
    """One GRU layer, one time step."""

    def __init__(self, d_in: int, d_hidden: int, bias: bool) -> None:
        super().__init__()
        self.x2h = nn.Linear(d_in, 3 * d_hidden, bias=bias)  # nn.GRU: weight_ih_l{l}, bias_ih_l{l}
        self.h2h = nn.Linear(d_hidden, 3 * d_hidden, bias=bias)  # nn.GRU: weight_hh_l{l}, bias_hh_l{l}
        for p in self.parameters():  # nn.GRU's init
            nn.init.uniform_(p, -d_hidden**-0.5, d_hidden**-0.5)
        self.hook_in, self.hook_x2h, self.hook_h2h = HookPoint(), HookPoint(), HookPoint()
        self.hook_reset_pre, self.hook_reset = HookPoint(), HookPoint()
        self.hook_update_pre, self.hook_update = HookPoint(), HookPoint()
        self.hook_candidate_pre, self.hook_candidate = HookPoint(), HookPoint()
        self.hook_hidden = HookPoint()

    def forward(self, x: Float[Tensor, "batch d_in"], h: Float[Tensor, "batch d_hidden"],
                t: int) -> Float[Tensor, "batch d_hidden"]:
        x = self.hook_in(x, step=t)
        x_r, x_z, x_n = self.hook_x2h(self.x2h(x), step=t).chunk(3, dim=-1)
        h_r, h_z, h_n = self.hook_h2h(self.h2h(h), step=t).chunk(3, dim=-1)
        r = self.hook_reset(torch.sigmoid(self.hook_reset_pre(x_r + h_r, step=t)), step=t)
        z = self.hook_update(torch.sigmoid(self.hook_update_pre(x_z + h_z, step=t)), step=t)
        # r scales h2h's candidate part *after* the matmul, bias included (nn.GRU's form, not Cho et al.'s)
        n = self.hook_candidate(torch.tanh(self.hook_candidate_pre(x_n + r * h_n, step=t)), step=t)
        return self.hook_hidden((1 - z) * n + z * h, step=t)


class GRU(HookedModel):
    """The layer stack: returns `ModelOutput.last_hidden_state`, the last layer's h_t for every step."""

    def __init__(self, cfg: GRUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_in) if cfg.include_emb else None
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.d_in) if cfg.include_emb else None
        for emb in (self.wte, self.wpe):
            if emb is not None:
                nn.init.normal_(emb.weight, std=cfg.initializer_range)
        self.layers = nn.ModuleList(GRUCell(cfg.d_in if l == 0 else cfg.d_model, cfg.d_model, cfg.include_bias)
                                    for l in range(cfg.n_layers))
        self.hook_input = HookPoint()

    def embed(self, input_ids: Int[Tensor, "batch time"] | None,
              inputs_embeds: Float[Tensor, "batch time d_in"] | None) -> Float[Tensor, "batch time d_in"]:
        """Layer 0's input: wte(ids) + wpe(0..T-1), or `inputs_embeds` exactly as given."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if self.wte is None:
                raise ValueError("this GRU has no embedding (include_emb=False): pass inputs_embeds of shape "
                                 f"(batch, time, d_in={self.cfg.d_in})")
            check_tokens(input_ids, self.cfg.vocab_size, self.cfg.max_position_embeddings)
            return self.wte(input_ids) + self.wpe(torch.arange(input_ids.shape[1], device=input_ids.device))
        shape = inputs_embeds.shape
        if len(shape) != 3 or shape[-1] != self.cfg.d_in or shape[1] == 0:
            raise ValueError(f"inputs_embeds must have shape (batch, time >= 1, d_in={self.cfg.d_in}), "
                             f"got {tuple(shape)}")
        return inputs_embeds

    def forward(self, input_ids: Int[Tensor, "batch time"] | None = None,
                inputs_embeds: Float[Tensor, "batch time d_in"] | None = None,
                attention_mask: Num[Tensor, "batch time"] | None = None) -> ModelOutput:
        """`attention_mask` is accepted for a common calling convention and unused: the recurrence is causal,
        so right padding never changes a real step's state (left padding does, as with nn.GRU unpacked)."""
        x = self.hook_input(self.embed(input_ids, inputs_embeds))
        h = [x.new_zeros(x.shape[0], self.cfg.d_model) for _ in self.layers]  # each layer's state, h_0 = 0
        outputs = []
        for t in range(x.shape[1]):
            inp = x[:, t]
            for l, cell in enumerate(self.layers):
                h[l] = cell(inp, h[l], t)
                inp = h[l]  # what the hook on hook_hidden returned: the next layer and step read this
            outputs.append(inp)
        return ModelOutput(last_hidden_state=torch.stack(outputs, dim=1))


class GRUClassifier(GRU):
    """pyvene's GRUForClassification: a linear score of the last layer's state at each row's last real step.

    The last real step is the last 1 in `attention_mask` (= mask.sum() - 1 with right padding, as pyvene takes
    it), or the last step without a mask."""

    def __init__(self, cfg: GRUConfig) -> None:
        super().__init__(cfg)
        self.score = nn.Linear(cfg.d_model, cfg.n_labels, bias=False)
        self.hook_logits = HookPoint()

    def forward(self, input_ids: Int[Tensor, "batch time"] | None = None,
                inputs_embeds: Float[Tensor, "batch time d_in"] | None = None,
                attention_mask: Num[Tensor, "batch time"] | None = None,
                labels: Tensor | None = None) -> ModelOutput:
        out = super().forward(input_ids, inputs_embeds)
        states = out.last_hidden_state
        batch, n_steps = states.shape[:2]
        last = torch.full((batch,), n_steps - 1, device=states.device)
        if attention_mask is not None:
            if attention_mask.shape != (batch, n_steps):
                raise ValueError(f"attention_mask must have shape {(batch, n_steps)}, "
                                 f"got {tuple(attention_mask.shape)}")
            steps = torch.arange(n_steps, device=states.device)
            last = torch.where(attention_mask.bool(), steps, -1).amax(dim=-1)
            if (last < 0).any():
                raise ValueError("attention_mask has a row with no real step to classify")
        out.logits = self.hook_logits(self.score(states[torch.arange(batch, device=states.device), last]))
        if labels is not None:
            out.loss = LOSSES[self.cfg.problem_type](out.logits, labels)
        return out


class GRULM(GRU):
    """The stack plus an (untied) `lm_head`: logits for every step, next-token loss with `labels`."""

    has_lm_head = True

    def __init__(self, cfg: GRUConfig) -> None:
        super().__init__(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.hook_logits = HookPoint()

    def forward(self, input_ids: Int[Tensor, "batch time"] | None = None,
                inputs_embeds: Float[Tensor, "batch time d_in"] | None = None,
                attention_mask: Num[Tensor, "batch time"] | None = None,
                labels: Int[Tensor, "batch time"] | None = None) -> ModelOutput:
        out = super().forward(input_ids, inputs_embeds)
        out.logits = self.hook_logits(self.lm_head(out.last_hidden_state))
        if labels is not None:
            out.loss = lm_loss(out.logits, labels)
        return out


# -- HuggingFace and pyvene attribute names -----------------------------------------------------------------------
GRU.config, GRU.cells = alias("cfg"), alias("layers")  # HuggingFace's name for the config; pyvene's for the layers
