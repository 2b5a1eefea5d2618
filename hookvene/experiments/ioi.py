"""Indirect object identification (IOI) prompts, after Wang et al. (2022), "Interpretability in the Wild".

An IOI prompt names two people, repeats one of them (the *subject*, S) and asks the model to complete with
the other one (the *indirect object*, IO)::

    BABA: "Then, [S] and [IO] went to the store. [S] gave a drink to"   -> " [IO]"
    ABBA: "Then, [IO] and [S] went to the store. [S] gave a drink to"   -> " [IO]"

The names occupy three *slots*: ``io`` (the single IO mention), ``s1`` (first S mention) and ``s2`` (the
repeated S mention).  Corrupted datasets (:func:`corrupt`) rewrite the names in those slots while keeping
everything else, so a clean and a corrupted prompt line up token by token -- the set-up that activation
patching needs.

Splits.  Every base template exists in both orders (ABBA is BABA with the first two names swapped), so a
template index means the same sentence frame in both families.  :data:`HELDOUT_TEMPLATE_IDS` are kept out
of training the bundled ``ioi-gpt2`` model; they only recombine words that also occur in training templates,
so held-out accuracy measures the algorithm, not unseen embeddings.  Name *pairs* are split too: 20% of the
unordered pairs (:data:`HELDOUT_NAME_PAIRS`, a fixed shuffle) never co-occur during training, in either
role or order, while every single name still occurs in many training pairs.

Token convention.  Names are always preceded by a space in the prompts, and the answer token is the first
token of ``" " + name`` (GPT-2 convention, e.g. ``"ĠMary"``); :func:`name_token` looks it up and refuses a
name that is not a single known token.

This module imports only the standard library and torch; tokenizers are passed in (any Hugging Face *fast*
tokenizer, since positions come from its offset mapping).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import combinations
from typing import TYPE_CHECKING, Literal, overload

import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:  # only for annotations: importing transformers here would make this module heavy
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "NAMES",
    "PLACES",
    "OBJECTS",
    "BASE_TEMPLATES",
    "TEMPLATES",
    "TRAIN_TEMPLATE_IDS",
    "HELDOUT_TEMPLATE_IDS",
    "TRAIN_NAME_PAIRS",
    "HELDOUT_NAME_PAIRS",
    "CORRUPTIONS",
    "IOIExample",
    "IOIDataset",
    "make_ioi_dataset",
    "corrupt",
    "name_token",
    "tokenize_ioi",
    "logit_diff",
    "METRIC_FIELDS",
]

Order = Literal["ABBA", "BABA"]
Corruption = Literal["abc", "swap_io_s", "random_names"]
CORRUPTIONS: tuple[str, ...] = ("abc", "swap_io_s", "random_names")
#: The entries of a :func:`tokenize_ioi` batch that describe the examples (for metrics), not model inputs: the
#: sweeps accept the whole batch and leave these out of the model's call.
METRIC_FIELDS: tuple[str, ...] = ("io_ids", "s_ids", "end_pos", "io_pos", "s1_pos", "s2_pos")

# Forty common first names from the IOI paper's list of names that are single tokens (with a leading
# space) for the GPT-2 tokenizer, so the same prompts also work on real GPT-2.
NAMES: tuple[str, ...] = (
    "Aaron", "Adam", "Alex", "Alice", "Amy", "Andrew", "Anna", "Arthur", "Brian", "Charles",
    "Daniel", "David", "Edward", "Emily", "Eric", "Frank", "George", "Henry", "Jack", "Jacob",
    "James", "Jane", "Jason", "Jennifer", "John", "Joseph", "Kate", "Kevin", "Laura", "Lisa",
    "Mark", "Martin", "Mary", "Michael", "Paul", "Peter", "Rachel", "Robert", "Sarah", "Thomas",
)  # fmt: skip
PLACES: tuple[str, ...] = (
    "store",
    "garden",
    "restaurant",
    "school",
    "hospital",
    "office",
    "house",
    "station",
)
OBJECTS: tuple[str, ...] = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")

# Base templates in BABA form: [B] is the subject (mentioned twice), [A] the indirect object, which is the
# answer and therefore not part of the prompt.  Adapted from the templates of Wang et al. (2022).
BASE_TEMPLATES: tuple[str, ...] = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
    "When [B] and [A] went to the [PLACE], [B] gave the [OBJECT] to",
    "Then, [B] and [A] were at the [PLACE]. [B] wanted to give the [OBJECT] to",
)


def _to_abba(template: str) -> str:
    """Swap the first [B] and [A] mentions: "X [B] and [A] ... [B]" becomes "X [A] and [B] ... [B]"."""
    i_b, i_a = template.index("[B]"), template.index("[A]")
    assert i_b < i_a, template
    return template[:i_b] + "[A]" + template[i_b + 3 : i_a] + "[B]" + template[i_a + 3 :]


TEMPLATES: dict[str, tuple[str, ...]] = {
    "BABA": BASE_TEMPLATES,
    "ABBA": tuple(_to_abba(t) for t in BASE_TEMPLATES),
}

# Held-out frames: each uses only words that some training template also uses (checked in the tests), but
# in a new arrangement ("After [B] and [A] went ..." vs. the trained "After the lunch, [B] and [A] ...").
HELDOUT_TEMPLATE_IDS: tuple[int, ...] = (5, 8, 14, 15)
TRAIN_TEMPLATE_IDS: tuple[int, ...] = tuple(i for i in range(len(BASE_TEMPLATES)) if i not in HELDOUT_TEMPLATE_IDS)


def _split_name_pairs() -> tuple[frozenset[frozenset[str]], frozenset[frozenset[str]]]:
    # A fixed, seeded shuffle rather than a rule on indices, so the held-out pairs have no structure a model
    # could pick up.  random.Random(int).shuffle is stable across CPython versions.
    pairs = [frozenset(p) for p in combinations(NAMES, 2)]
    random.Random(20221101).shuffle(pairs)
    n_heldout = len(pairs) // 5
    return frozenset(pairs[n_heldout:]), frozenset(pairs[:n_heldout])


#: Unordered name pairs {a, b}; a pair is either trained on (in both roles) or held out (in both roles).
TRAIN_NAME_PAIRS, HELDOUT_NAME_PAIRS = _split_name_pairs()

_SLOT_RE = re.compile(r"\[(A|B|PLACE|OBJECT)\]")


@dataclass(frozen=True)
class IOIExample:
    """One IOI prompt.

    ``io`` and ``s`` are the names whose logits the metric compares.  For a clean example they are also the
    names in the prompt; for a corrupted example (see :func:`corrupt`) they are copied from the clean example
    it is aligned with, while ``slot_names`` says which names the corrupted prompt actually contains.
    """

    prompt: str
    io: str
    s: str
    template: int  # index into BASE_TEMPLATES (the same frame in TEMPLATES["ABBA"] and TEMPLATES["BABA"])
    order: Order
    place: str = ""
    obj: str = ""
    slot_names: tuple[str, str, str] = ("", "", "")  # names written at the (io, s1, s2) slots
    slot_chars: tuple[int, int, int] = (0, 0, 0)  # character index where each of those names starts

    @property
    def completion(self) -> str:
        """The correct continuation of a clean prompt, with the GPT-2 leading space: ``" " + io``."""
        return " " + self.io


def _render(template_id: int, order: Order, io: str, s1: str, s2: str, place: str, obj: str) -> IOIExample:
    """Fill a template; slot names may differ from (io, s) only when building corrupted prompts."""
    template = TEMPLATES[order][template_id]
    parts: list[str] = []
    chars: dict[str, int] = {}
    n_b = 0
    pos = 0
    length = 0
    for m in _SLOT_RE.finditer(template):
        literal = template[pos : m.start()]
        parts.append(literal)
        length += len(literal)
        kind = m.group(1)
        if kind == "A":
            chars["io"], word = length, io
        elif kind == "B":
            n_b += 1
            slot = "s1" if n_b == 1 else "s2"
            chars[slot], word = length, (s1 if n_b == 1 else s2)
        else:
            word = place if kind == "PLACE" else obj
        parts.append(word)
        length += len(word)
        pos = m.end()
    parts.append(template[pos:])
    return IOIExample(
        prompt="".join(parts),
        io=io,
        s=s1,
        template=template_id,
        order=order,
        place=place,
        obj=obj,
        slot_names=(io, s1, s2),
        slot_chars=(chars["io"], chars["s1"], chars["s2"]),
    )


@dataclass
class IOIDataset:
    """A list of :class:`IOIExample` plus what is needed to build aligned corruptions of it.

    ``name_pool`` is the set of names fresh names are drawn from by :func:`corrupt`; ``corruption`` is
    ``None`` for a clean dataset, else the kind it was built with.
    """

    examples: list[IOIExample]
    seed: int
    name_pool: tuple[str, ...]
    corruption: str | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[IOIExample]:
        return iter(self.examples)

    @overload
    def __getitem__(self, idx: int) -> IOIExample: ...
    @overload
    def __getitem__(self, idx: slice) -> IOIDataset: ...
    def __getitem__(self, idx: int | slice) -> IOIExample | IOIDataset:
        if isinstance(idx, slice):
            return replace(self, examples=self.examples[idx])
        return self.examples[idx]

    @property
    def prompts(self) -> list[str]:
        return [e.prompt for e in self.examples]

    @property
    def io_names(self) -> list[str]:
        return [e.io for e in self.examples]

    @property
    def s_names(self) -> list[str]:
        return [e.s for e in self.examples]

    def texts(self, end: str = ".") -> list[str]:
        """Full sentences ``prompt + " " + io + end`` (what a language model is trained on)."""
        return [e.prompt + e.completion + end for e in self.examples]


def _resolve_templates(templates: str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(templates, str):
        table = {
            "train": TRAIN_TEMPLATE_IDS,
            "heldout": HELDOUT_TEMPLATE_IDS,
            "all": tuple(range(len(BASE_TEMPLATES))),
        }
        if templates not in table:
            raise ValueError(f"templates must be 'train', 'heldout', 'all' or a list of ids, got {templates!r}")
        return table[templates]
    ids = tuple(templates)
    if not ids:
        raise ValueError("templates is empty")
    for i in ids:
        if not isinstance(i, int) or not 0 <= i < len(BASE_TEMPLATES):
            raise ValueError(f"template id {i!r} is not in range(0, {len(BASE_TEMPLATES)})")
    return ids


def _resolve_pairs(names: str | Sequence[str]) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """Ordered (io, s) pairs to sample from, and the pool of names corruptions may draw from."""
    if isinstance(names, str):
        if names == "train":
            allowed = TRAIN_NAME_PAIRS
        elif names == "heldout":
            allowed = HELDOUT_NAME_PAIRS
        elif names == "all":
            allowed = None
        else:
            raise ValueError(f"names must be 'train', 'heldout', 'all' or a list of names, got {names!r}")
        pool = NAMES
    else:
        pool = tuple(names)
        for name in pool:
            if not isinstance(name, str) or not name or any(c.isspace() for c in name):
                raise ValueError(f"a name must be a non-empty string without whitespace, got {name!r}")
        if len(set(pool)) != len(pool):
            raise ValueError("names contains duplicates")
        if len(pool) < 2:
            raise ValueError(f"need at least 2 names to form (io, s) pairs, got {list(pool)}")
        allowed = None
    pairs = [(a, b) for a in pool for b in pool if a != b and (allowed is None or frozenset((a, b)) in allowed)]
    return pairs, pool


def make_ioi_dataset(
    n: int,
    *,
    seed: int,
    templates: str | Sequence[int] = "all",
    names: str | Sequence[str] = "all",
    order: str = "both",
) -> IOIDataset:
    """Sample ``n`` clean IOI prompts, deterministically for a given ``seed``.

    Args:
        n: number of examples (> 0).
        seed: seed of the private ``random.Random`` used; the global RNGs are untouched.
        templates: ``"train"``, ``"heldout"``, ``"all"`` or explicit base-template ids.
        names: ``"train"`` / ``"heldout"`` (sample (io, s) from :data:`TRAIN_NAME_PAIRS` /
            :data:`HELDOUT_NAME_PAIRS`), ``"all"`` (any two distinct :data:`NAMES`) or an explicit list of
            names (any two distinct ones).
        order: ``"ABBA"``, ``"BABA"`` or ``"both"`` (alternating ABBA, BABA, ... so the mix is exactly even).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if order not in ("ABBA", "BABA", "both"):
        raise ValueError(f"order must be 'ABBA', 'BABA' or 'both', got {order!r}")
    template_ids = _resolve_templates(templates)
    pairs, pool = _resolve_pairs(names)
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        o: Order = ("ABBA" if i % 2 == 0 else "BABA") if order == "both" else order  # type: ignore[assignment]
        t = rng.choice(template_ids)
        io, s = rng.choice(pairs)
        examples.append(_render(t, o, io, s, s, rng.choice(PLACES), rng.choice(OBJECTS)))
    return IOIDataset(examples=examples, seed=seed, name_pool=pool)


def corrupt(
    dataset: IOIDataset, kind: str, *, seed: int | None = None, names: Sequence[str] | None = None
) -> IOIDataset:
    """Corrupted copy of ``dataset``, aligned example by example (same template, order, place and object).

    Kinds (Wang et al. 2022, section 3):
        ``"abc"``: the three name slots get three distinct names, none of them the clean IO or S, so no
            name repeats and the prompt carries no IOI signal (the paper's "ABC distribution").
        ``"swap_io_s"``: the s2 slot gets the IO name, so the repeated name flips and the correct answer
            becomes the clean S (the clean logit difference should change sign).
        ``"random_names"``: IO and S are consistently replaced by two fresh names; the structure is intact
            but the clean names do not occur.

    Each corrupted example keeps the clean ``io`` and ``s`` (the names the metric compares) and records the
    names in its prompt in ``slot_names``.  Token lengths equal the clean ones whenever every name is one
    token.  ``seed`` defaults to one derived from the dataset's; ``names`` defaults to its ``name_pool``.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")
    if dataset.corruption is not None:
        raise ValueError(f"dataset is already corrupted ({dataset.corruption!r}); corrupt the clean one")
    pool = tuple(names) if names is not None else dataset.name_pool
    # A str seed is hashed with SHA-512 by random.Random: stable across runs, independent of PYTHONHASHSEED.
    rng = random.Random(f"{dataset.seed if seed is None else seed}/{kind}")
    out = []
    for e in dataset.examples:
        if kind == "swap_io_s":
            io_slot, s1_slot, s2_slot = e.io, e.s, e.io
        else:
            fresh = [x for x in pool if x not in (e.io, e.s)]
            need = 3 if kind == "abc" else 2
            if len(fresh) < need:
                raise ValueError(f"corruption {kind!r} needs {need} names besides {e.io!r} and {e.s!r}; pool {pool}")
            picked = rng.sample(fresh, need)
            if kind == "abc":
                io_slot, s1_slot, s2_slot = picked
            else:
                io_slot, s1_slot, s2_slot = picked[0], picked[1], picked[1]
        c = _render(e.template, e.order, io_slot, s1_slot, s2_slot, e.place, e.obj)
        out.append(replace(c, io=e.io, s=e.s))
    return IOIDataset(examples=out, seed=dataset.seed, name_pool=pool, corruption=kind)


def name_token(tokenizer: PreTrainedTokenizerBase, name: str) -> int:
    """Token id of ``" " + name`` (the GPT-2 leading-space convention that the prompts use for names).

    Raises:
        ValueError: naming ``name`` if it is not exactly one token, or maps to the unknown token.
    """
    ids = tokenizer.encode(" " + name, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) != 1 or (unk is not None and ids[0] == unk):
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"name {name!r} is not a single known token for this tokenizer: ' {name}' -> {pieces}")
    return ids[0]


def _token_at(offsets: Sequence[tuple[int, int]], char: int, prompt: str) -> int:
    # The token whose span covers the name's first character.  Some tokenizers include the leading space in
    # the span and some trim it; "start <= char < end" is right either way.
    for t, (start, end) in enumerate(offsets):
        if start <= char < end:
            return t
    raise ValueError(f"no token covers character {char} of {prompt!r}")


def tokenize_ioi(
    dataset: IOIDataset, tokenizer: PreTrainedTokenizerBase, *, prepend_bos: bool = False
) -> dict[str, Tensor]:
    """Tokenize and pad a dataset; return the tensors the IOI analyses need.

    Returns a dict of tensors:
        ``input_ids``, ``attention_mask``: ``Int[Tensor, "batch pos"]``, padded on the tokenizer's
            ``padding_side`` (right unless it says left) with its pad token (else eos, else 0).
        ``io_ids``, ``s_ids``: ``Int[Tensor, "batch"]``, :func:`name_token` of the example's io and s.
        ``end_pos``: ``Int[Tensor, "batch"]``, index of the last real token (where the answer is predicted).
        ``io_pos``, ``s1_pos``, ``s2_pos``: ``Int[Tensor, "batch"]``, index of the token of each name slot.

    Special tokens are added as the tokenizer does by default; ``prepend_bos=True`` additionally puts
    ``bos_token_id`` first when the tokenizer did not (as TransformerLens does for GPT-2).

    Raises:
        ValueError: if the tokenizer is not a fast one (offsets are needed), or any name in the dataset is
            not a single token (the error names it).
    """
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenize_ioi needs a fast (Rust) tokenizer: positions come from its offset mapping")
    token_of: dict[str, int] = {}
    for e in dataset:
        for name in (e.io, e.s, *e.slot_names):
            if name not in token_of:
                token_of[name] = name_token(tokenizer, name)

    enc = tokenizer(dataset.prompts, return_offsets_mapping=True)
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise ValueError("prepend_bos=True but the tokenizer has no bos_token_id")
    rows: list[list[int]] = []
    positions: list[tuple[int, int, int]] = []
    for e, ids, offsets in zip(dataset, enc["input_ids"], enc["offset_mapping"]):
        ids = list(ids)
        shift = 0
        if prepend_bos and (not ids or ids[0] != bos):
            ids, shift = [bos, *ids], 1
        slots = tuple(_token_at(offsets, c, e.prompt) + shift for c in e.slot_chars)
        for slot_pos, name in zip(slots, e.slot_names):
            if ids[slot_pos] != token_of[name]:  # e.g. a tokenizer that merges the name with a neighbour
                raise ValueError(f"name {name!r} is not tokenized as ' {name}' inside {e.prompt!r}")
        rows.append(ids)
        positions.append(slots)  # type: ignore[arg-type]

    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    width = max(len(r) for r in rows)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets_from_left = torch.zeros(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        start = width - len(r) if left else 0
        input_ids[i, start : start + len(r)] = torch.tensor(r)
        attention_mask[i, start : start + len(r)] = 1
        offsets_from_left[i] = start
    lengths = attention_mask.sum(dim=1)
    pos = torch.tensor(positions, dtype=torch.long) + offsets_from_left[:, None]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "io_ids": torch.tensor([token_of[e.io] for e in dataset], dtype=torch.long),
        "s_ids": torch.tensor([token_of[e.s] for e in dataset], dtype=torch.long),
        "end_pos": offsets_from_left + lengths - 1,
        "io_pos": pos[:, 0],
        "s1_pos": pos[:, 1],
        "s2_pos": pos[:, 2],
    }


@overload
def logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"],
    batch: Mapping[str, Tensor],
    per_example: Literal[False] = False,
) -> Float[Tensor, ""]: ...
@overload
def logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"], batch: Mapping[str, Tensor], per_example: Literal[True]
) -> Float[Tensor, " batch"]: ...
def logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"], batch: Mapping[str, Tensor], per_example: bool = False
) -> Float[Tensor, ""] | Float[Tensor, " batch"]:
    """``logits[IO] - logits[S]`` at each example's ``end_pos``; the batch mean unless ``per_example``.

    Differentiable and left on the logits' device (no ``.item()``), so it can serve as a patching metric or
    a loss.  ``batch`` is a :func:`tokenize_ioi` dict (``io_ids``, ``s_ids``, ``end_pos`` are used).
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, pos, d_vocab], got shape {tuple(logits.shape)}")
    end_pos: Int[Tensor, " batch"] = batch["end_pos"].to(logits.device)
    if end_pos.shape[0] != logits.shape[0]:
        raise ValueError(f"logits have batch {logits.shape[0]} but the batch dict has {end_pos.shape[0]} examples")
    rows = torch.arange(logits.shape[0], device=logits.device)
    final = logits[rows, end_pos]  # [batch, d_vocab]
    diff = final[rows, batch["io_ids"].to(logits.device)] - final[rows, batch["s_ids"].to(logits.device)]
    return diff if per_example else diff.mean()
