"""`hookvene.from_pretrained`: a hub name, a local HF checkpoint directory, a bundled model name, or an in-memory
`transformers` model -> the hookvene model of its architecture.

Dispatch is a table keyed by the HF class name; each architecture's loader (`loading/<arch>.py`) has
`convert(hf_config_dict, state_dict, lm_head, what) -> (meta model, converted state dict)`.
"""

import copy as copying
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
    "LlamaForCausalLM": ("llama", True),
    "LlamaModel": ("llama", False),
    "MistralForCausalLM": ("llama", True),
    "MistralModel": ("llama", False),
    "Qwen2ForCausalLM": ("llama", True),
    "Qwen2Model": ("llama", False),
    "GPTNeoXForCausalLM": ("gpt_neox", True),
    "GPTNeoXModel": ("gpt_neox", False),
}
# HF model_type -> class, for config.json files without an `architectures` entry
MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "gpt_neo": "GPTNeoForCausalLM", "t5": "T5ForConditionalGeneration",
               "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "gpt_neox": "GPTNeoXForCausalLM"}

ZOO_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "zoo")


def zoo_models() -> list[str]:
    """Names of the checkpoints shipped inside the package (usable wherever a model name is taken)."""
    if not os.path.isdir(ZOO_DIR):
        return []
    return sorted(d for d in os.listdir(ZOO_DIR) if os.path.isfile(os.path.join(ZOO_DIR, d, "config.json")))


def resolve_path(name: str, allow_pickle: bool = False) -> str:
    """A local directory for `name`: itself, a bundled model, or a download from the HF hub (pickle weights only
    with `allow_pickle`). A path that cannot be a hub name (absolute, `./...`, `~/...`, a file) must exist locally."""
    if not isinstance(name, str):
        raise TypeError(f"a model name or checkpoint directory must be a string, got {type(name).__name__}")
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise NotADirectoryError(f"{name!r} is a file, not a checkpoint directory: pass the directory holding "
                                 f"config.json and model.safetensors")
    bundled = name.removeprefix("hookvene/")
    if bundled in zoo_models():
        return os.path.join(ZOO_DIR, bundled)
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        raise FileNotFoundError(f"no such directory: {name!r} (a local checkpoint directory must exist; hub names "
                                f"look like 'gpt2' or 'org/name'; bundled models: {zoo_models()})")
    return _download(name, allow_pickle)


def _download(name: str, allow_pickle: bool = False) -> str:
    try:
        from huggingface_hub import snapshot_download

        meta = ["*.json", "*.txt", "*.model"]
        path = snapshot_download(name, allow_patterns=meta + ["*.safetensors"])
        if allow_pickle and not any(f.endswith(".safetensors") for f in os.listdir(path)):  # older repos
            path = snapshot_download(name, allow_patterns=meta + ["*.bin"])
        return path
    except Exception as e:
        raise OSError(
            f"could not fetch {name!r} from the HuggingFace hub ({type(e).__name__}; offline?). hookvene also "
            f"loads a local checkpoint directory: on a machine with network, run "
            f"`AutoModelForCausalLM.from_pretrained({name!r}).save_pretrained('DIR')` (and the same for the "
            f"tokenizer), copy DIR here and pass its path (no local directory {name!r} exists). Bundled models "
            f"that need no network: {zoo_models()}"
        ) from None


def _architecture(hf_config: dict[str, Any], fallback: str | None = None) -> str:
    archs = hf_config.get("architectures") or []
    arch = fallback or (archs[0] if archs else MODEL_TYPES.get(hf_config.get("model_type", "")))
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch or hf_config.get('model_type')!r}; hookvene supports "
                         f"{', '.join(ARCHITECTURES)}")
    return arch


def from_pretrained(source: str | nn.Module, *, lm_head: bool | None = None, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, copy: bool = False,
                    allow_pickle: bool = False, tokenizer: Any = None, fold_ln: bool = False,
                    center_writing_weights: bool = False, center_unembed: bool = False,
                    fold_value_biases: bool = False, refactor_factored_attn_matrices: bool = False,
                    device_map: str | dict[str, Any] | None = None,
                    max_memory: dict[Any, int | str] | None = None) -> nn.Module:
    """Load a hookvene model.

    Args:
        source: a local HF checkpoint directory, a bundled model name (see `zoo_models()`), a hub name (needs
            the network), or a `transformers` model object. The object's weight tensors are shared, not copied
            (each Parameter keeps its `requires_grad`): in-place edits of the weights, and `.to(device)` /
            `.half()` on the hookvene model, reach the `transformers` model too. `copy=True` copies them first.
        lm_head: keep (True) or drop (False) the unembedding; default: whatever the checkpoint's class has.
        dtype: the weights' dtype; default: as stored (a bf16 checkpoint loads as bf16). A checkpoint directory
            is read one tensor at a time, each converted as it is read (peak: the loaded model plus one tensor).
        device: where the weights go; a checkpoint directory is read straight onto it.
        device_map, max_memory: spread the blocks over several devices with `accelerate` (an optional dependency:
            `pip install 'hookvene[distributed]'`): "auto" (fill GPU 0, 1, ... then the CPU, within `max_memory`,
            e.g. {0: "20GiB", 1: "20GiB"}), "balanced", "sequential", or a dict {module name: device} such as
            {"embed": 0, "blocks.0": 0, ..., "blocks.23": 1, "ln_final": 1, "unembed": 1}. Blocks stay whole;
            hooks see each activation on its block's device (see `hookvene.loading.placement`).
        allow_pickle: read a checkpoint that has only pickle weights (`pytorch_model.bin`), with
            `torch.load(weights_only=True)`; by default only `model.safetensors` is read.
        tokenizer: kept as `model.tokenizer` (for `to_tokens`, string inputs, ...); default: the one saved in
            the checkpoint directory, if any (a `transformers` model object brings none).
        fold_ln, center_writing_weights, center_unembed, fold_value_biases, refactor_factored_attn_matrices:
            TransformerLens's weight processing (see `HookedModel.process_weights`), applied to a copy of the
            weights. All off by default, unlike TL's `from_pretrained`: the model then computes exactly what
            `transformers` computes; TL's defaults are fold_ln, center_writing_weights, center_unembed and
            fold_value_biases on.
    """
    processing = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                      fold_value_biases=fold_value_biases,
                      refactor_factored_attn_matrices=refactor_factored_attn_matrices)
    copy = copy or any(processing.values())  # processing edits weights in place: never the caller's tensors
    if device_map is not None and device is not None:
        raise ValueError("pass device= (one device) or device_map= (several), not both")
    if isinstance(source, nn.Module):
        if not hasattr(source, "config") or not hasattr(source.config, "to_dict"):
            raise ValueError(f"{type(source).__name__} is not a transformers model; supported: "
                             f"{', '.join(ARCHITECTURES)}")
        if copy:
            source = copying.deepcopy(source)  # tied weights stay tied in the copy
        hf = source.config.to_dict()
        arch = _architecture(hf, type(source).__name__)
        state = dict(source.state_dict(keep_vars=True))  # Parameters themselves, so weights are shared
        what = f"{type(source).__name__} object"
    else:
        path = resolve_path(source, allow_pickle)
        hf, state = read_checkpoint_dir(path, allow_pickle, dtype=dtype, device=device)
        arch = _architecture(hf)
        what = f"checkpoint {path!r}"
    module, has_head = ARCHITECTURES[arch]
    loader = importlib.import_module(f"hookvene.loading.{module}")
    model, converted = loader.convert(hf, state, has_head if lm_head is None else lm_head, what)
    model = load_into(model, converted, dtype)
    model.eval()
    if tokenizer is None and not isinstance(source, nn.Module):
        tokenizer = load_tokenizer(path)
    model.tokenizer = tokenizer
    if any(processing.values()):
        model.process_weights(**processing)
    if device_map is not None:
        from hookvene.loading.placement import dispatch

        return dispatch(model, device_map, max_memory)
    return model.to(device) if device is not None else model


def from_config(config: Any, *, lm_head: bool = True) -> nn.Module:
    """A randomly initialised hookvene model for a `transformers` config (`GPT2Config(n_embd=24, n_layer=2)`).

    `transformers` builds and initialises its own model, so the weights are drawn as there; that model is then
    converted like any checkpoint, so unsupported options are refused with the same messages. `lm_head` picks
    the class with (True) or without (False) the LM head."""
    import transformers

    if not hasattr(config, "to_dict") or not hasattr(config, "model_type"):
        raise ValueError(f"from_config takes a transformers config (e.g. transformers.GPT2Config), not "
                         f"{type(config).__name__}")
    arch = _architecture({"model_type": config.model_type})
    module = ARCHITECTURES[arch][0]
    arch = next(a for a, (m, head) in ARCHITECTURES.items() if m == module and head == lm_head)
    return from_pretrained(getattr(transformers, arch)(config))


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


__all__ = ["ARCHITECTURES", "CheckpointError", "from_config", "from_pretrained", "load_tokenizer", "resolve_path",
           "zoo_models"]
