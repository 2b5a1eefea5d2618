"""Run by tests/test_distributed.py, once per rank under `torchrun` (and once on its own, as the reference): every
sweep on a small checkpoint, saved to OUT/rank{r}.pt for the test to compare.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py CHECKPOINT_DIR OUT_DIR
"""

import os
import sys

import torch

import hookvene as pv
from hookvene import distributed
from hookvene.experiments import activation_patch, attribution_patch, causal_trace, path_patch
from hookvene.experiments.metrics import logit_diff


def inputs(model, n: int = 6, n_pos: int = 7):
    gen = torch.Generator().manual_seed(3)
    clean = torch.randint(0, model.cfg.d_vocab, (n, n_pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, model.cfg.d_vocab, (n,), generator=gen)
    answer, wrong = torch.randint(0, model.cfg.d_vocab, (2, n), generator=gen)
    return clean, corrupted, logit_diff(answer, wrong)


def sweeps(model) -> dict[str, torch.Tensor]:
    clean, corrupted, metric = inputs(model)
    out = {}
    for kind in ("heads", "resid_pre", "heads_pos", "mlp_layer"):
        out[f"patch:{kind}"] = activation_patch(model, clean, corrupted, metric, kind=kind, batch_size=16).values
    out["attribution:heads"] = attribution_patch(model, clean, corrupted, metric, kind="heads").values
    out["path:logits"] = path_patch(model, clean, corrupted, metric, batch_size=16).values
    out["path:receivers"] = path_patch(model, clean, corrupted, metric, receivers=[("blocks.1.attn.hook_q", 0)],
                                       batch_size=16).values
    out["trace"] = causal_trace(model, clean[:1], subject=[1, 2], target=5, n_samples=3, batch_size=12).values
    return out


COLLECT_HOOKS = ["blocks.0.hook_resid_post", "blocks.2.mlp.hook_post"]
COLLECT_PROMPTS = [list(range(1 + i % 5, 4 + i % 7)) for i in range(9)]  # 9 prompts of 2 to 8 tokens


def collect(model, out: str) -> None:
    pv.collect_activations(model, COLLECT_PROMPTS, COLLECT_HOOKS, batch_size=2, out=out, rows_per_shard=6)


def main(checkpoint: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env()
    model = pv.from_pretrained(checkpoint)
    collect(model, os.path.join(out_dir, "acts"))  # every rank writes its share of the batches into one folder
    results = sweeps(model)
    if distributed.is_distributed():
        with distributed.local():  # each rank alone: the same values, computed without the others
            results |= {f"local:{k}": v for k, v in sweeps(model).items() if k.startswith("patch:heads")}
        clean, corrupted, metric = inputs(model, n=4 + distributed.rank())  # different work on each rank
        try:
            activation_patch(model, clean, corrupted, metric, kind="heads")
            results["mismatch"] = "no error"
        except ValueError as e:
            results["mismatch"] = str(e)
        torch.distributed.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{os.environ.get('RANK', '0')}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
