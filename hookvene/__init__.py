"""hookvene: hooked, readable models (GPT-2, GPT-Neo, GPT-NeoX, Llama / Mistral / Qwen2, T5, GRU) with a
pyvene-style intervention API.

    import hookvene as pv
    _, tokenizer, gpt2 = pv.create_gpt2("path/to/checkpoint")
    out, cache = gpt2.run_with_cache(tokenizer("Hello", return_tensors="pt").input_ids)
"""

from hookvene import models
from hookvene.causal_model import CausalModel
from hookvene.collect import ActivationShards, collect_activations, load_activations
from hookvene.components import Site, type_to_dimension_mapping, type_to_module_mapping
from hookvene.config import IntervenableConfig, RepresentationConfig
from hookvene.create import create_gpt2, create_gpt2_lm, create_gpt_neo, create_llama, create_t5
from hookvene.hooks import ActivationCache, HookedModule, HookPoint, act_name
from hookvene.intervenable import IntervenableModel, IntervenableModelOutput
from hookvene.interventions import (
    AdditionIntervention,
    AutoencoderIntervention,
    BasisAgnosticIntervention,
    BoundlessRotatedSpaceIntervention,
    CollectIntervention,
    ConstantSourceIntervention,
    DistributedRepresentationIntervention,
    Intervention,
    JumpReLUAutoencoderIntervention,
    LambdaIntervention,
    LocalistRepresentationIntervention,
    LowRankRotatedSpaceIntervention,
    NoiseIntervention,
    RotatedSpaceIntervention,
    SharedWeightsTrainableIntervention,
    SigmoidMaskIntervention,
    SigmoidMaskRotatedSpaceIntervention,
    SkipIntervention,
    SourcelessIntervention,
    SubtractionIntervention,
    TrainableIntervention,
    VanillaIntervention,
    ZeroIntervention,
    register_intervention,
)
from hookvene.loading import from_pretrained, zoo_models
from hookvene.loading.gru import create_gru, create_gru_classifier, create_gru_lm, from_torch_gru, load_gru
from hookvene.loading.gru import save_pretrained as save_gru
from hookvene.loading.mlp import create_mlp_classifier
from hookvene.locations import GET_LOC
from hookvene.models import (
    GPT2,
    GPT2LM,
    GRU,
    GRULM,
    T5,
    T5LM,
    GPT2Config,
    GPTNeo,
    GPTNeoConfig,
    GPTNeoLM,
    GPTNeoX,
    GPTNeoXConfig,
    GPTNeoXLM,
    GRUClassifier,
    GRUConfig,
    Llama,
    LlamaConfig,
    LlamaLM,
    MLPClassifier,
    MLPConfig,
    MLPForClassification,
    MLPModel,
    T5Config,
)
from hookvene.sae import SAE, SAEConfig, sae_site
from hookvene.utils import count_parameters, embed_to_distrib, format_token, set_seed, top_vals

__version__ = "0.1.0"
