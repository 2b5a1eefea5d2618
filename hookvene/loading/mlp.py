"""pyvene's `create_mlp_classifier`: the MLP classifier of its DAS tutorials, randomly initialised.

pyvene's MLP has no pretrained checkpoints on the hub, so there is no weight table here; the model's parameters
already carry pyvene's names (`mlp.h[i].ff1`, `score`) through the aliases at the bottom of `models/mlp.py`.
"""

from hookvene.models.mlp import MLPClassifier, MLPConfig


def create_mlp_classifier(config: MLPConfig, tokenizer_name: str | None = None,
                          cache_dir: str | None = None) -> tuple[MLPConfig, None, MLPClassifier]:
    """(config, None, a randomly initialised MLPClassifier), as pyvene's `create_mlp_classifier` returns them (it
    has no tokenizer either: the MLP reads `inputs_embeds`)."""
    if not isinstance(config, MLPConfig):
        raise ValueError(f"create_mlp_classifier takes an MLPConfig, not {type(config).__name__}")
    if tokenizer_name is not None:
        raise ValueError("the MLP classifier reads inputs_embeds and has no tokenizer; leave tokenizer_name unset")
    return config, None, MLPClassifier(config).eval()

__all__ = ["create_mlp_classifier"]
