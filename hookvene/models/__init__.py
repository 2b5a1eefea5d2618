"""The hookvene model zoo: one readable file per architecture, a HookPoint at every activation.

Dimension glossary (used in every jaxtyping annotation and einsum string):

    batch    examples in a batch                     b
    pos      token positions (q_pos / k_pos when queries and keys differ, e.g. with a KV cache)   q, k
    enc_pos  T5 encoder positions seen by cross-attention
    d_model  residual stream width
    head     attention heads                          h
    kv_head  key/value heads (grouped-query attention: fewer than query heads, each shared by a group)
    d_head   per-head width (d_model / head for GPT-2) d
    d_mlp    MLP hidden width
    d_vocab  vocabulary size
    time     GRU time steps
    d_hidden GRU hidden width
"""

from hookvene.models import constants
from hookvene.models.gpt2 import GPT2, GPT2LM, GPT2Config
from hookvene.models.gpt_neo import GPTNeo, GPTNeoConfig, GPTNeoLM
from hookvene.models.gpt_neox import GPTNeoX, GPTNeoXConfig, GPTNeoXLM
from hookvene.models.gru import GRU, GRULM, GRUCell, GRUClassifier, GRUConfig
from hookvene.models.llama import Llama, LlamaConfig, LlamaLM
from hookvene.models.mlp import MLP, MLPClassifier, MLPConfig, MLPForClassification, MLPModel
from hookvene.models.t5 import T5, T5LM, T5Config

__all__ = ["GPT2", "GPT2LM", "GPT2Config", "GPTNeo", "GPTNeoConfig", "GPTNeoLM",
           "GPTNeoX", "GPTNeoXConfig", "GPTNeoXLM", "Llama", "LlamaConfig", "LlamaLM",
           "GRU", "GRULM", "GRUCell", "GRUClassifier", "GRUConfig", "T5", "T5LM", "T5Config",
           "MLP", "MLPClassifier", "MLPConfig", "MLPModel", "MLPForClassification"]
