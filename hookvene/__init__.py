"""hookvene: hooked, readable models (GPT-2, GPT-Neo, T5, GRU) with a pyvene-style intervention API."""

from hookvene.hooks import ActivationCache, HookedModule, HookPoint, act_name
from hookvene.loading import from_pretrained, zoo_models
from hookvene.models import GPT2, GPT2LM, GPT2Config

__version__ = "0.1.0"
