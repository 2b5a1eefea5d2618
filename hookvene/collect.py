"""Activations of many prompts streamed to disk: `collect_activations` writes, `ActivationShards` reads.

    store = collect_activations(model, prompts, ["blocks.3.hook_resid_post"], batch_size=32, out="acts/")
    for batch in store.batches("blocks.3.hook_resid_post", batch_size=4096, shuffle=True):   # (4096, d_model)
        ...                                                                                   # e.g. an SAE step

The format (a folder; every file is plain safetensors or JSON, readable without hookvene):

    acts/collect.json          {"format": "hookvene-activations/1", "hooks": [...], "batch_size": B,
                               "world_size": W, "dtype": "float32", "shapes": {hook: [d, ...]}}
    acts/rank00000-shard00000.safetensors, rank00000-shard00001.safetensors, rank00001-shard00000..., ...

Each shard holds whole batches of prompts, one row per real (non-padding) token: for every hook a tensor
(rows, d, ...) (`hook_z`: (rows, head, d_head)), `example` (rows,) the prompt's index in the input and `position`
(rows,) the token's position in it. The safetensors metadata says which batches it covers (`first_batch`,
`last_batch`) and its `rows`. A shard appears only once complete (written under a temporary name, then renamed).

What it guarantees:
- bounded memory: at most `rows_per_shard` rows (plus one batch) are held before a shard is written;
- each forward stops right after the last hook it needs fires (`StopForward`), so nothing later is computed;
- resumable: called again with the same arguments after an interruption, it skips the batches its shards
  already hold and appends new shards: no row is written twice (rows of an unfinished shard are recomputed);
- under `torchrun`, batch b goes to rank b % world_size and every rank writes its own shards to the same
  folder (a shared file system across machines); the call returns once every rank is done.
"""

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from hookvene.distributed import barrier, gather_objects, is_distributed, is_main, rank, world_size
from hookvene.hooks import StopForward

FORMAT = "hookvene-activations/1"
SHARD = re.compile(r"rank(\d{5})-shard(\d{5})\.safetensors$")
NOT_PER_TOKEN = ("hook_pattern", "hook_attn_scores", "hook_position_bias")  # (batch, head, q, k): no token rows


@dataclass
class _Buffer:
    """Rows waiting to be written: per hook a list of (rows, ...) tensors, and the batches they came from."""

    acts: dict[str, list[Tensor]] = field(default_factory=dict)
    example: list[Tensor] = field(default_factory=list)
    position: list[Tensor] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    rows: int = 0


def collect_activations(model: nn.Module, data: Any, hook_names: Sequence[str], *, out: str, batch_size: int = 32,
                        rows_per_shard: int = 65536, dtype: torch.dtype | None = None,
                        prepend_bos: bool | None = None, progress: bool = False) -> "ActivationShards":
    """Run `data` through `model` in batches and write the activations at `hook_names` to safetensors shards in
    the folder `out` (see the module doc for the format); returns a reader of the whole folder.

    Args:
        data: the prompts: a list (or any iterable, e.g. a generator) of strings (tokenised with the model's
            tokenizer, as `to_tokens`: BOS prepended unless `prepend_bos=False`) or of token sequences (lists or
            1-D tensors of ids), or a 2-D tensor of ids (one prompt per row). Rows of a batch are padded on the
            right; padding positions are not written.
        hook_names: hooks whose tensors start with (batch, pos): residual streams, MLP activations, hook_z, ...
        batch_size: prompts per forward pass (part of the folder's identity: a resumed run must use the same).
        rows_per_shard: token rows held in memory before a shard is written (the memory bound).
        dtype: store activations in this dtype (e.g. torch.bfloat16 halves the disk); default: as computed.
    """
    hook_names = list(dict.fromkeys(hook_names))
    if getattr(model, "is_encoder_decoder", False):
        raise ValueError(f"collect_activations runs prompts through decoder-only models (one token row per prompt "
                         f"token); {type(model).__name__} needs decoder inputs too: use run_with_cache")
    if not hook_names:
        raise ValueError("collect_activations needs at least one hook name, e.g. 'blocks.0.hook_resid_post'")
    missing = [h for h in hook_names if h not in model.hook_dict]
    if missing:
        raise ValueError(f"{type(model).__name__} has no hook points {missing}; see model.hook_dict")
    bad = [h for h in hook_names if h.endswith(NOT_PER_TOKEN)]
    if bad:
        raise ValueError(f"{bad} are (batch, head, q, k) tensors, not one row per token; collect_activations takes "
                         f"hooks shaped (batch, pos, ...): read attention patterns with run_with_cache")
    if batch_size < 1 or rows_per_shard < 1:
        raise ValueError(f"batch_size and rows_per_shard must be >= 1, got {batch_size} and {rows_per_shard}")
    r, world = rank(), world_size()
    info = {"format": FORMAT, "hooks": hook_names, "batch_size": batch_size, "world_size": world,
            "dtype": str(dtype or model.dtype).removeprefix("torch.")}
    done = _start(out, info, r)  # batches this rank's shards already hold
    n_shard = len(_shards(out, r))
    buf = _Buffer()
    shapes: dict[str, list[int]] = {}
    batches = _batches(data, batch_size)
    from tqdm.auto import tqdm

    for b, batch in tqdm(batches, desc="collect", unit="batch", disable=not (progress and is_main())):
        if b % world != r or b <= done:  # another rank's batch, or already on disk
            continue
        ids, mask, first = _tokens(model, batch, b * batch_size, prepend_bos)
        acts = _forward(model, ids, mask, hook_names)
        keep = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
        for h, x in acts.items():
            x = x.detach()[keep.to(x.device)].to("cpu", dtype or x.dtype)
            shapes[h] = list(x.shape[1:])
            buf.acts.setdefault(h, []).append(x)
        rows_ex, rows_pos = keep.nonzero(as_tuple=True)
        buf.example.append(rows_ex + first)
        buf.position.append(rows_pos)
        buf.batches.append(b)
        buf.rows += int(keep.sum())
        if buf.rows >= rows_per_shard:
            _write(out, r, n_shard, buf)
            n_shard, buf = n_shard + 1, _Buffer()
    if buf.rows:
        _write(out, r, n_shard, buf)
    if is_distributed():  # every rank's shapes (a rank may have had no batch), and all shards on disk
        for s in gather_objects(shapes):
            shapes |= s
        barrier()
    if is_main() and shapes:
        _write_json(out, info | {"shapes": shapes})
    barrier()
    return ActivationShards(out)


def _start(out: str, info: dict[str, Any], r: int) -> int:
    """Check or create the folder; the last batch this rank has written (-1 for none)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "collect.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        same = {k: old.get(k) for k in info} == info
        if not same:
            raise ValueError(f"{out!r} holds a collection made with other settings ({ {k: old.get(k) for k in info} });"
                             f" to resume it, call again with those; else pass an empty folder")
    else:
        barrier()  # every rank has looked before rank 0 creates it
        if is_main():
            _write_json(out, info)
    barrier()
    for name in os.listdir(out):  # a shard being written when the run stopped: its batches are redone
        if name.endswith(".tmp") and name.startswith(f"rank{r:05d}-"):
            os.remove(os.path.join(out, name))
    last = [int(_metadata(p)["last_batch"]) for p in _shards(out, r)]
    return max(last, default=-1)


def _write_json(out: str, info: dict[str, Any]) -> None:
    tmp = os.path.join(out, "collect.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(out, "collect.json"))


def _shards(out: str, r: int | None = None) -> list[str]:
    """Shard paths, of one rank or all, in (rank, shard) order."""
    found = sorted((int(m.group(1)), int(m.group(2)), name) for name in os.listdir(out) if (m := SHARD.match(name)))
    return [os.path.join(out, name) for rk, _, name in found if r is None or rk == r]


def _metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def _write(out: str, r: int, n: int, buf: _Buffer) -> None:
    """One shard, atomically: written under a temporary name, then renamed."""
    from safetensors.torch import save_file

    tensors = {h: torch.cat(xs) for h, xs in buf.acts.items()}
    tensors |= {"example": torch.cat(buf.example), "position": torch.cat(buf.position)}
    meta = {"format": FORMAT, "rank": str(r), "first_batch": str(buf.batches[0]), "last_batch": str(buf.batches[-1]),
            "rows": str(buf.rows)}
    path = os.path.join(out, f"rank{r:05d}-shard{n:05d}.safetensors")
    save_file(tensors, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def _batches(data: Any, batch_size: int) -> Iterator[tuple[int, Any]]:
    """(batch index, the batch's prompts) over a tensor of ids or any iterable of prompts, read lazily."""
    if isinstance(data, Tensor):
        if data.dim() != 2:
            raise ValueError(f"a tensor of prompts must be (prompts, pos) token ids, got shape {tuple(data.shape)}")
        yield from enumerate(data.split(batch_size))
        return
    if isinstance(data, str):
        data = [data]
    it = iter(data)
    b = 0
    while batch := list(islice(it, batch_size)):
        yield b, batch
        b += 1


def _tokens(model: nn.Module, batch: Any, first: int, prepend_bos: bool | None) -> tuple[Tensor, Tensor | None, int]:
    """(ids, padding mask or None when no row is padded, global index of the batch's first prompt)."""
    if isinstance(batch, Tensor):
        return batch.long(), None, first
    if all(isinstance(p, str) for p in batch):
        ids, mask = model.tokens_and_mask(batch, prepend_bos=prepend_bos, padding_side="right")
    else:
        rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in batch]
        if any(isinstance(p, str) for p in batch) or any(len(p) == 0 for p in rows):
            raise ValueError("each prompt must be a string or a non-empty sequence of token ids, one kind per call")
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(p) for p in rows], batch_first=True)
    return ids, (None if bool(mask.all()) else mask), first


def _forward(model: nn.Module, ids: Tensor, mask: Tensor | None, hooks: list[str]) -> dict[str, Tensor]:
    """One forward, stopped as soon as every hook in `hooks` has fired."""
    acts: dict[str, Tensor] = {}

    def save(x: Tensor, hook: Any) -> None:
        if hook.step is not None:
            raise ValueError(f"{hook.name} fires once per time step (GRU); collect_activations takes hooks that fire "
                             f"once per forward: read it with run_with_cache")
        if tuple(x.shape[:2]) != tuple(ids.shape):
            raise ValueError(f"{hook.name} has shape {tuple(x.shape)}, not (batch, pos, ...) = {tuple(ids.shape)}: "
                             f"collect_activations writes one row per token")
        acts[hook.name] = x
        if len(acts) == len(hooks):
            raise StopForward  # the rest of the model would compute nothing we keep

    device = model.device
    kwargs = {} if mask is None else {"attention_mask": mask.to(device)}
    with torch.no_grad(), model.hooks([(h, save) for h in hooks]):
        try:
            model(input_ids=ids.to(device), **kwargs)
        except StopForward:
            pass
    return acts


class ActivationShards:
    """A folder written by `collect_activations`, read one shard at a time (memory: one shard).

    `hooks`, `shapes`, `rows` (total), `shards` (paths); iterate for each shard's tensors as a dict (the hooks,
    `example`, `position`); `batches(hook, batch_size)` for training batches."""

    def __init__(self, path: str) -> None:
        info_path = os.path.join(path, "collect.json")
        if not os.path.isfile(info_path):
            raise FileNotFoundError(f"{path!r} holds no collect.json: not a folder written by collect_activations")
        with open(info_path) as f:
            self.info = json.load(f)
        self.path = path
        self.hooks: list[str] = self.info["hooks"]
        self.shapes: dict[str, list[int]] = self.info.get("shapes", {})
        # in batch order: the order of the prompts when the collection ran on one process
        self.shards = sorted(_shards(path), key=lambda p: int(_metadata(p)["first_batch"]))
        self.rows = sum(int(_metadata(p)["rows"]) for p in self.shards)

    def __len__(self) -> int:
        return self.rows

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        from safetensors.torch import load_file

        for p in self.shards:
            yield load_file(p)

    def batches(self, hook: str, batch_size: int, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[Tensor]:
        """(batch_size, ...) tensors of one hook across all shards; `shuffle` permutes the shard order and the rows
        within each shard (a shard-local shuffle: memory stays one shard plus one batch)."""
        if hook not in self.hooks:
            raise ValueError(f"{hook!r} was not collected here; hooks: {self.hooks}")
        from safetensors import safe_open

        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=gen).tolist() if shuffle else range(len(self.shards))
        carry: Tensor | None = None
        for i in order:
            with safe_open(self.shards[i], framework="pt") as f:
                x = f.get_tensor(hook)
            if shuffle:
                x = x[torch.randperm(x.shape[0], generator=gen)]
            if carry is not None:
                x = torch.cat([carry, x])
            full = x.shape[0] // batch_size * batch_size
            yield from x[:full].split(batch_size)
            carry = x[full:] if full < x.shape[0] else None
        if carry is not None and not drop_last:
            yield carry


def load_activations(path: str) -> ActivationShards:
    """The reader of a folder written by `collect_activations`."""
    return ActivationShards(path)


__all__ = ["ActivationShards", "collect_activations", "load_activations"]
