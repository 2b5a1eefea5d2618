"""`hookvene.from_pretrained`: a hub name, a local HF checkpoint directory, a bundled model name, or an in-memory
`transformers` model -> the hookvene model of its architecture.

Dispatch is a table keyed by the HF class name; each architecture's loader (`loading/<arch>.py`) has
`convert(hf_config_dict, state_dict, lm_head, what) -> (meta model, converted state dict)`.
"""

import importlib
import os
from typing import Any

import torch
from torch import nn

from hookvene.loading.common import CheckpointError, load_into, read_checkpoint_dir

# HF class name -> (hookvene loader module, whether the class carries an LM head)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "GPT2LMHeadModel": ("gpt2", True),
    "GPT2Model": ("gpt2", False),
    "GPTNeoForCausalLM": ("gpt_neo", True),
    "GPTNeoModel": ("gpt_neo", False),
    "T5ForConditionalGeneration": ("t5", True),
    "T5Model": ("t5", False),
}
# HF model_type -> class, for config.json files without an `architectures` entry
MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "gpt_neo": "GPTNeoForCausalLM", "t5": "T5ForConditionalGeneration"}

ZOO_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "zoo")


def zoo_models() -> list[str]:
    """Names of the checkpoints shipped inside the package (usable wherever a model name is taken)."""
    if not os.path.isdir(ZOO_DIR):
        return []
    return sorted(d for d in os.listdir(ZOO_DIR) if os.path.isfile(os.path.join(ZOO_DIR, d, "config.json")))


def resolve_path(name: str) -> str:
    """A local directory for `name`: itself, a bundled model, or a download from the HF hub."""
    if os.path.isdir(name):
        return name
    bundled = name.removeprefix("hookvene/")
    if bundled in zoo_models():
        return os.path.join(ZOO_DIR, bundled)
    return _download(name)


def _download(name: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        meta = ["*.json", "*.txt", "*.model"]
        path = snapshot_download(name, allow_patterns=meta + ["*.safetensors"])
        if not any(f.endswith(".safetensors") for f in os.listdir(path)):  # older repos: pytorch_model.bin only
            path = snapshot_download(name, allow_patterns=meta + ["*.bin"])
        return path
    except Exception as e:
        raise OSError(
            f"could not fetch {name!r} from the HuggingFace hub ({type(e).__name__}; offline?). hookvene also "
            f"loads a local checkpoint directory: on a machine with network, run "
            f"`AutoModelForCausalLM.from_pretrained({name!r}).save_pretrained('DIR')` (and the same for the "
            f"tokenizer), copy DIR here and pass its path. Bundled models that need no network: {zoo_models()}"
        ) from None


def _architecture(hf_config: dict[str, Any], fallback: str | None = None) -> str:
    archs = hf_config.get("architectures") or []
    arch = fallback or (archs[0] if archs else MODEL_TYPES.get(hf_config.get("model_type", "")))
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch or hf_config.get('model_type')!r}; hookvene supports "
                         f"{', '.join(ARCHITECTURES)}")
    return arch


def from_pretrained(source: str | nn.Module, *, lm_head: bool | None = None, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> nn.Module:
    """Load a hookvene model.

    Args:
        source: a local HF checkpoint directory, a bundled model name (see `zoo_models()`), a hub name (needs
            the network), or a `transformers` model object, whose weight tensors are then shared, not copied.
        lm_head: keep (True) or drop (False) the unembedding; default: whatever the checkpoint's class has.
        dtype, device: optional conversion of the loaded weights.
    """
    if isinstance(source, nn.Module):
        if not hasattr(source, "config") or not hasattr(source.config, "to_dict"):
            raise ValueError(f"{type(source).__name__} is not a transformers model; supported: "
                             f"{', '.join(ARCHITECTURES)}")
        hf = source.config.to_dict()
        arch = _architecture(hf, type(source).__name__)
        state = dict(source.state_dict(keep_vars=True))  # Parameters themselves, so weights are shared
        what = f"{type(source).__name__} object"
    else:
        path = resolve_path(source)
        hf, state = read_checkpoint_dir(path)
        arch = _architecture(hf)
        what = f"checkpoint {path!r}"
    module, has_head = ARCHITECTURES[arch]
    loader = importlib.import_module(f"hookvene.loading.{module}")
    model, converted = loader.convert(hf, state, has_head if lm_head is None else lm_head, what)
    model = load_into(model, converted, dtype)
    model.eval()
    return model.to(device) if device is not None else model


def load_tokenizer(path: str) -> Any:
    """The tokenizer saved next to a checkpoint, or None when the directory has none."""
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")
    if not any(os.path.isfile(os.path.join(path, f)) for f in files):
        return None  # transformers 5 would hand back an empty tokenizer instead of failing
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


__all__ = ["ARCHITECTURES", "CheckpointError", "from_pretrained", "load_tokenizer", "resolve_path", "zoo_models"]
