"""pyvene's model helpers: `create_gpt2()` and friends return `(config, tokenizer, model)`.

`name` may be a hub name (needs the network), a local HF checkpoint directory, or a bundled model name
(`hookvene.zoo_models()`). The tokenizer is the one saved next to the checkpoint (None if there is none).
"""

from typing import Any

from torch import nn

from hookvene.loading import from_config, from_pretrained, load_tokenizer, resolve_path
from hookvene.models import GPT2, GPT2LM, T5LM, GPT2Config, GPTNeoConfig, GPTNeoLM, T5Config


def _create(name: str, lm_head: bool, **kwargs: Any) -> tuple[Any, Any, nn.Module]:
    path = resolve_path(name)
    model = from_pretrained(path, lm_head=lm_head, **kwargs)
    return model.config, load_tokenizer(path), model


def _random(config: Any, hooked_config: type, hooked: type, model_type: str,
            lm_head: bool) -> tuple[Any, None, nn.Module]:
    """A randomly initialised model and no tokenizer, from a hookvene config (`hooked_config`, built as `hooked`)
    or a `transformers` config of `model_type` (initialised by `transformers`, then converted)."""
    if isinstance(config, hooked_config):
        model = hooked(config).eval()
    elif getattr(config, "model_type", None) == model_type and hasattr(config, "to_dict"):
        model = from_config(config, lm_head=lm_head)
    else:
        raise ValueError(f"config must be a hookvene {hooked_config.__name__} or a transformers config with "
                         f"model_type={model_type!r}, not {type(config).__name__} "
                         f"(model_type={getattr(config, 'model_type', None)!r})")
    return model.config, None, model


def create_gpt2(name: str = "gpt2", cache_dir: str | None = None, config: Any = None,
                **kwargs: Any) -> tuple[Any, Any, nn.Module]:
    """GPT-2 without its LM head (outputs `last_hidden_state`), as pyvene's `create_gpt2`. With `config` (a
    hookvene or `transformers` GPT2Config), a randomly initialised model and no tokenizer."""
    if config is not None:
        return _random(config, GPT2Config, GPT2, "gpt2", lm_head=False)
    return _create(name, lm_head=False, **kwargs)


def create_gpt2_lm(name: str = "gpt2", config: Any = None, cache_dir: str | None = None,
                   **kwargs: Any) -> tuple[Any, Any, nn.Module]:
    """GPT-2 with its LM head (outputs `logits`). With `config` (a hookvene or `transformers` GPT2Config), a
    randomly initialised model and no tokenizer."""
    if config is not None:
        return _random(config, GPT2Config, GPT2LM, "gpt2", lm_head=True)
    return _create(name, lm_head=True, **kwargs)


def create_gpt_neo(name: str = "roneneldan/TinyStories-33M", cache_dir: str | None = None, config: Any = None,
                   **kwargs: Any) -> tuple[Any, Any, nn.Module]:
    """GPT-Neo with its LM head (the TinyStories models by default). With `config` (a hookvene or `transformers`
    GPTNeoConfig), a randomly initialised model and no tokenizer."""
    if config is not None:
        return _random(config, GPTNeoConfig, GPTNeoLM, "gpt_neo", lm_head=True)
    return _create(name, lm_head=True, **kwargs)


def create_t5(name: str = "google/flan-t5-small", cache_dir: str | None = None, config: Any = None,
              **kwargs: Any) -> tuple[Any, Any, nn.Module]:
    """T5 (original or v1.1/FLAN) with its LM head. With `config` (a hookvene or `transformers` T5Config), a
    randomly initialised model and no tokenizer."""
    if config is not None:
        return _random(config, T5Config, T5LM, "t5", lm_head=True)
    return _create(name, lm_head=True, **kwargs)


def create_llama(name: str = "sharpbai/alpaca-7b-merged", cache_dir: str | None = None, dtype: Any = None,
                 config: Any = None, **kwargs: Any) -> tuple[Any, Any, nn.Module]:
    """A Llama-family causal LM (Llama, Mistral or Qwen2 checkpoints) with its LM head, as pyvene's `create_llama`.

    `dtype=None` keeps the dtype the checkpoint stores (pyvene's default converts to bfloat16; Llama checkpoints
    are mostly stored in it). With `config` (a hookvene `LlamaConfig`, or a `transformers` Llama / Mistral /
    Qwen2 config), a randomly initialised model and no tokenizer."""
    if config is not None:
        from hookvene.loading.llama import config_from_hf
        from hookvene.models.llama import LlamaConfig, LlamaLM

        cfg = config if isinstance(config, LlamaConfig) else config_from_hf(config.to_dict())
        model = LlamaLM(cfg).eval()
        return cfg, None, model.to(dtype) if dtype is not None else model
    return _create(name, lm_head=True, dtype=dtype, **kwargs)
