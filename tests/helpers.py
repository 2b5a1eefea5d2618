"""Tiny local stand-ins for hub checkpoints: a byte-level BPE tokenizer and random-initialised HF models.

Nothing here touches the network; every checkpoint is built from a config and saved to a temporary directory.
"""

import os

import torch

CORPUS = [
    "When John and Mary went to the shops, Mary gave the book to John.",
    "The capital of Spain is Madrid. The capital of Italy is Rome. The capital of China is Beijing.",
    "The language of Spain is Spanish. The Space Needle is in downtown Seattle.",
    "The Colosseum is in the city of Rome. The Eiffel Tower is in the city of Paris.",
    "John and Mary went to the store. Alice and Bob went to the store.",
    "Once upon a time there was a little girl. I am very happy and I am very sad and today I feel good.",
    "Hello world. happy sad Paris Rome Seattle Madrid Italy Spain China the a of in is to and",
]


def make_tokenizer(vocab_size: int = 600):
    """A GPT-2-style byte-level BPE tokenizer trained on CORPUS (leading-space tokens like ' Rome')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def save_checkpoint(model, tokenizer, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def tiny_gpt2(tokenizer=None, seed: int = 0, **overrides):
    """A random GPT2LMHeadModel in eval mode with eager attention (so HF exposes attention patterns)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
              vocab_size=len(tokenizer) if tokenizer is not None else 101, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**kw, attn_implementation="eager")).eval()


# TransformerLens's opt-in hook points (set_use_attn_result, set_use_split_qkv_input, set_use_attn_in,
# set_use_hook_mlp_in): they exist in hook_dict but fire only when their flag is on
GATED_HOOKS = ("attn.hook_result", "hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_in", "hook_mlp_in")


def ungated_hooks(model) -> list[str]:
    """The hook points that fire in a plain forward pass."""
    return [n for n in model.hook_dict if not n.endswith(GATED_HOOKS)]


# -- numeric checks shared by the tests ---------------------------------------------------------------------------

ATOL = 1e-5  # float32 agreement between two computations of the same thing


def close(a, b, atol=ATOL):
    """Same shape and max |a - b| <= atol, equal infinities allowed (masked attention scores); the error is shown
    on failure."""
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=0.0, atol=atol, check_dtype=False)


def differs(a, b):
    """The intervention really changed something: max |a - b| > 1e-4."""
    assert (a - b).abs().max().item() > 1e-4, "the intervention changed nothing"


def token_pair(vocab: int, batch: int, pos: int, changed: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random clean batch (ids 1..vocab-1) and a corrupted copy that differs at position `changed` only."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, vocab, (batch, pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, changed] = torch.randint(1, vocab, (batch,), generator=g)
    return clean, corrupted
