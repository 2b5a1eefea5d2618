"""pyvene's model helpers: `create_gpt2()` and friends return `(config, tokenizer, model)`.

`name` may be a hub name (needs the network), a local HF checkpoint directory, or a bundled model name
(`hookvene.zoo_models()`). The tokenizer is the one saved next to the checkpoint (None if there is none).
"""

from typing import Any

from torch import nn

from hookvene.loading import from_pretrained, load_tokenizer, resolve_path


def _create(name: str, lm_head: bool, **kwargs: Any) -> tuple[Any, Any, nn.Module]:
    path = resolve_path(name)
    model = from_pretrained(path, lm_head=lm_head, **kwargs)
    return model.config, load_tokenizer(path), model


def create_gpt2(name: str = "gpt2", cache_dir: str | None = None, **kwargs: Any) -> tuple[Any, Any, nn.Module]:
    """GPT-2 without its LM head (outputs `last_hidden_state`), as pyvene's `create_gpt2`."""
    return _create(name, lm_head=False, **kwargs)


def create_gpt2_lm(name: str = "gpt2", config: Any = None, cache_dir: str | None = None,
                   **kwargs: Any) -> tuple[Any, Any, nn.Module]:
    """GPT-2 with its LM head (outputs `logits`). With a hookvene `GPT2Config`, a randomly initialised model."""
    if config is not None:
        from hookvene.models.gpt2 import GPT2LM

        return config, None, GPT2LM(config)
    return _create(name, lm_head=True, **kwargs)


def create_gpt_neo(name: str = "roneneldan/TinyStories-33M", cache_dir: str | None = None,
                   **kwargs: Any) -> tuple[Any, Any, nn.Module]:
    """GPT-Neo with its LM head (the TinyStories models by default)."""
    return _create(name, lm_head=True, **kwargs)


def create_t5(name: str = "google/flan-t5-small", cache_dir: str | None = None,
              **kwargs: Any) -> tuple[Any, Any, nn.Module]:
    """T5 (original or v1.1/FLAN) with its LM head."""
    return _create(name, lm_head=True, **kwargs)
