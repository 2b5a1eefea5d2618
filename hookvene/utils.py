"""Small helpers from pyvene's public surface (`embed_to_distrib`, `top_vals`, `format_token`, `set_seed`) and
`as_inputs`, the one place model inputs are normalised."""

import random
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn


def as_inputs(x: Any) -> dict[str, Any]:
    """Model keyword inputs from a token tensor (batch, pos) or a tokenizer's output (any mapping)."""
    if isinstance(x, Tensor):
        return {"input_ids": x}
    if isinstance(x, Mapping):
        return dict(x)
    raise ValueError(f"model inputs must be a dict of tensors (a tokenizer's output) or a tensor, "
                     f"not {type(x).__name__}")


def warn_unknown_tokens(tokenizer: Any, ids: Tensor, where: str = "the input") -> None:
    """Warn when token ids contain the tokenizer's unknown token: a word outside its vocabulary was replaced, and
    every activation after it describes a different text (the bundled ioi-gpt2 knows only 96 words)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    # GPT-2's byte-level tokenizer names <|endoftext|> as its unknown token too, though it never produces it for a
    # word: a BOS there is not an unknown word.
    shared = {getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    if unk is None or unk in shared or not bool((torch.as_tensor(ids) == unk).any()):
        return
    warnings.warn(f"{where} contains {tokenizer.unk_token!r} (id {unk}): words outside this tokenizer's vocabulary "
                  f"were replaced by it, so the model sees a different text than the one written", stacklevel=3)


def unembedding_weight(model: nn.Module) -> Tensor:
    """(d_vocab, d_model): the LM head if the model has one, else the (tied) token embedding."""
    head = getattr(model, "unembed", None)
    if head is not None:
        return head.weight
    embed = getattr(model, "embed", None) or getattr(model, "shared", None)
    if embed is None:
        raise ValueError(f"{type(model).__name__} has no token embedding to project onto")
    return embed.weight


def embed_to_distrib(model: nn.Module, embed: Float[Tensor, "... d_model"], log: bool = False,
                     logits: bool = False) -> Float[Tensor, "... d_vocab"]:
    """Project hidden states onto the vocabulary: softmax (or log-softmax, or raw logits) of `embed @ W_U^T`."""
    with torch.inference_mode():
        scores = embed @ unembedding_weight(model).T
        if logits:
            return scores
        return scores.log_softmax(dim=-1) if log else scores.softmax(dim=-1)


def format_token(tokenizer: Any, tok: int) -> str:
    """Decoded token with spaces shown as `_` and newlines as `\\n`."""
    return tokenizer.decode(tok).replace(" ", "_").replace("\n", "\\n")


def top_vals(tokenizer: Any, res: Float[Tensor, " d_vocab"], n: int = 10,
             return_results: bool = False) -> list[tuple[str, float]] | None:
    """Print (or return) the n highest-valued tokens of a distribution."""
    top = torch.topk(res, n)
    out = [(format_token(tokenizer, int(i)), float(v)) for v, i in zip(top.values, top.indices)]
    if return_results:
        return out
    for tok, v in out:
        print(f"{tok:<20} {v}")
    return None


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_prompt(prompt: str, answer: str | list[str], model: Any, prepend_space_to_answer: bool = True,
                print_details: bool = True, prepend_bos: bool | None = None, top_k: int = 10) -> list[int]:
    """TransformerLens's prompt check: run `prompt + answer` and print, for each answer token, its rank, logit and
    probability after the tokens before it, with the top-k predictions there. Returns the answer tokens' ranks
    (0 = the model's top prediction). `model` is any hookvene language model with a tokenizer."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    ranks: list[int] = []
    for ans in answers:
        if prepend_space_to_answer and not ans.startswith(" "):
            ans = " " + ans
        prompt_tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
        answer_tokens = model.to_tokens(ans, prepend_bos=False)
        tokens = torch.cat([prompt_tokens, answer_tokens], dim=1)
        with torch.no_grad():
            probs = model(tokens, return_type="logits")[0].float()
        logits, probs = probs, probs.softmax(-1)
        n_prompt = prompt_tokens.shape[1]
        if print_details:
            print("Tokenized prompt:", model.to_str_tokens(prompt_tokens[0]))
            print("Tokenized answer:", model.to_str_tokens(answer_tokens[0]))
        for i, tok in enumerate(answer_tokens[0].tolist()):
            at = n_prompt - 1 + i  # the position whose next-token prediction is this answer token
            order = logits[at].argsort(descending=True)
            rank = int((order == tok).nonzero()[0, 0])
            ranks.append(rank)
            if print_details:
                print(f"Performance on answer token:\nRank: {rank:<8} Logit: {logits[at, tok]:5.2f} "
                      f"Prob: {probs[at, tok]:6.2%} Token: |{model.to_single_str_token(tok)}|")
                for k in range(top_k):
                    t = int(order[k])
                    print(f"Top {k}th token. Logit: {logits[at, t]:5.2f} Prob: {probs[at, t]:6.2%} "
                          f"Token: |{model.to_single_str_token(t)}|")
    if print_details:
        print("Ranks of the answer tokens:", list(zip(model.to_str_tokens(torch.tensor(
            [t for a in answers for t in model.to_tokens(a if a.startswith(" ") or not prepend_space_to_answer
                                                         else " " + a, prepend_bos=False)[0].tolist()])), ranks)))
    return ranks


test_prompt.__test__ = False  # a TransformerLens name, not a pytest test
