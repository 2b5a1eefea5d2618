"""pyvene's MLP classifier (`MLPConfig`, `create_mlp_classifier`), the toy model of its DAS tutorials, with a
HookPoint on every activation.

Features of the architecture:
- optional token + position embeddings (`include_emb`); otherwise the caller feeds `inputs_embeds` (batch, pos,
  d_model), usually with a single position;
- a stack of blocks out = act(ff1(x)), each d_model -> d_model, with no residual stream and no normalisation;
- a linear `score` to n_labels classes (optionally squeezing the position dimension, pyvene's `squeeze_output`).

Hook names per block: `blocks.{i}.hook_in` (the block's input), `hook_pre` (ff1's output), `hook_post` (after the
activation: pyvene's `mlp_activation`), `hook_out` (the block's output: pyvene's `block_output`). In pyvene the block
ends with dropout, so in eval mode `hook_out` equals `hook_post`; hookvene has no dropout (`pdrop` is stored only).
"""

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from jaxtyping import Float, Int
from torch import Tensor, nn

from hookvene.hooks import HookPoint
from hookvene.models.common import ACTIVATIONS, LOSSES, HFAliases, HookedModel, ModelOutput, alias, runtime_flags


@runtime_flags
@dataclass(init=False)
class MLPConfig(HFAliases):
    """Sizes of the MLP. pyvene's names work as keywords and attributes (`MLPConfig(h_dim=3, n_layer=1,
    num_classes=5)`, `cfg.h_dim`); canonical names follow the other models (`d_model`, `n_layers`, `n_labels`)."""

    include_emb: bool
    vocab_size: int
    max_position_embeddings: int
    n_layers: int
    d_model: int
    n_labels: int
    act_fn: str
    pdrop: float  # stored for pyvene compatibility; nothing drops out
    problem_type: str
    include_bias: bool
    squeeze_output: bool  # logits (batch, n_labels) instead of (batch, pos, n_labels): pos must then be 1

    # TransformerLens's cfg names (see HFAliases in models/common.py)
    tl_cfg: ClassVar[dict[str, str | None]] = {"normalization_type": None, "positional_embedding_type": None,
                                               "eps": None}
    hf_aliases: ClassVar[dict[str, str]] = {
        "n_layer": "n_layers", "num_hidden_layers": "n_layers", "h_dim": "d_model", "hidden_size": "d_model",
        "num_classes": "n_labels", "num_labels": "n_labels", "activation_function": "act_fn",
    }

    def __init__(self, include_emb: bool = False, vocab_size: int = 50257, max_position_embeddings: int = 512,
                 n_layer: int = 2, h_dim: int = 512, num_classes: int = 2, activation_function: str = "gelu",
                 pdrop: float = 0.3, problem_type: str = "single_label_classification", include_bias: bool = True,
                 squeeze_output: bool = True, *, num_labels: int | None = None, **unused: Any) -> None:
        # pyvene's MLPConfig is a transformers PretrainedConfig and swallows unknown keywords; so do we, but only
        # the harmless ones transformers itself adds (a typo in a size must not pass silently)
        unknown = sorted(k for k in unused if k not in ("initializer_range", "architectures", "model_type",
                                                        "transformers_version", "torch_dtype", "dtype"))
        if unknown:
            raise ValueError(f"unknown MLPConfig argument(s) {unknown}")
        if activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function={activation_function!r} is not supported; choose one of "
                             f"{sorted(ACTIVATIONS)}")
        if problem_type not in LOSSES:
            raise ValueError(f"problem_type={problem_type!r} is not one of {sorted(LOSSES)}")
        small = [f"{n}={v}" for n, v in (("n_layer", n_layer), ("h_dim", h_dim), ("num_classes", num_classes))
                 if not isinstance(v, int) or v < 1]
        if small:
            raise ValueError(f"MLPConfig sizes must be positive integers: {', '.join(small)}")
        self.include_emb, self.vocab_size = include_emb, vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.n_layers, self.d_model = n_layer, h_dim
        self.n_labels = num_labels if num_labels is not None else num_classes
        self.act_fn, self.pdrop, self.problem_type = activation_function, pdrop, problem_type
        self.include_bias, self.squeeze_output = include_bias, squeeze_output

    def to_dict(self) -> dict[str, Any]:
        """pyvene's field names, so that a saved config reads as pyvene's does."""
        names = {"n_layers": "n_layer", "d_model": "h_dim", "n_labels": "num_classes", "act_fn": "activation_function"}
        return {names.get(k, k): v for k, v in asdict(self).items()}


class Block(nn.Module):
    """out = act(ff1(x)): pyvene's MLPBlock (HF-style names kept: `ff1`, `act`)."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.ff1 = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.include_bias)
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_in, self.hook_pre, self.hook_post, self.hook_out = HookPoint(), HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_in(x)
        post = self.hook_post(self.act(self.hook_pre(self.ff1(x))))
        return self.hook_out(post)


class MLP(HookedModel):
    """The block stack; returns `ModelOutput.last_hidden_state` (batch, pos, d_model). pyvene: MLPModel."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.include_emb:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # HF: wte
            self.pos_embed = nn.Embedding(cfg.max_position_embeddings, cfg.d_model)  # HF: wpe
            self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))

    def forward(self, input_ids: Int[Tensor, "batch pos"] | None = None,
                position_ids: Int[Tensor, "batch pos"] | None = None,
                inputs_embeds: Float[Tensor, "batch pos d_model"] | None = None) -> ModelOutput:
        """Token ids need `include_emb`; position embeddings are added when `position_ids` are given (as in
        pyvene). `inputs_embeds` (batch, pos, d_model) go to block 0 as they are."""
        if inputs_embeds is None:
            if not self.cfg.include_emb:
                raise ValueError("this MLP has no embeddings (include_emb=False): pass inputs_embeds "
                                 "(batch, pos, d_model)")
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.hook_embed(self.embed(input_ids))
            if position_ids is not None:
                inputs_embeds = inputs_embeds + self.hook_pos_embed(self.pos_embed(position_ids))
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.cfg.d_model:
            raise ValueError(f"inputs_embeds must have shape (batch, pos, {self.cfg.d_model}), "
                             f"got {tuple(inputs_embeds.shape)}")
        x = inputs_embeds
        for block in self.blocks:
            x = block(x)
        return ModelOutput(last_hidden_state=x)


class MLPClassifier(MLP):
    """The stack plus a linear `score` over every position (pyvene: MLPForClassification); `loss` with `labels`."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__(cfg)
        self.score = nn.Linear(cfg.d_model, cfg.n_labels, bias=cfg.include_bias)
        self.hook_logits = HookPoint()

    def forward(self, input_ids: Int[Tensor, "batch pos"] | None = None,
                position_ids: Int[Tensor, "batch pos"] | None = None,
                inputs_embeds: Float[Tensor, "batch pos d_model"] | None = None,
                labels: Tensor | None = None) -> ModelOutput:
        out = super().forward(input_ids, position_ids, inputs_embeds)
        logits = self.score(out.last_hidden_state)  # batch pos n_labels
        if self.cfg.squeeze_output:
            if logits.shape[1] != 1:
                raise ValueError(f"squeeze_output=True needs one position, got {logits.shape[1]}; build the "
                                 f"model with squeeze_output=False for longer inputs")
            logits = logits.squeeze(1)
        out.logits = self.hook_logits(logits)
        if labels is not None:
            out.loss = LOSSES[self.cfg.problem_type](out.logits.reshape(-1, self.cfg.n_labels), labels)
        return out


# -- HuggingFace and pyvene attribute names -----------------------------------------------------------------------
# pyvene's oracles walk the model as `clf.mlp.h[0].ff1` and `clf.score`: these aliases answer; hook names stay.
MLP.config, MLP.h = alias("cfg"), alias("blocks")
MLP.wte, MLP.wpe = alias("embed"), alias("pos_embed")
MLP.mlp = property(lambda self: self, doc="pyvene's `MLPForClassification.mlp`: the model itself.")
MLPModel, MLPForClassification = MLP, MLPClassifier  # pyvene's class names
