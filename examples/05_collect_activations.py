"""Tutorial 5: collecting activations without modifying them, on a batch of IOI prompts.

CollectIntervention reads a component's activations (here block_output of an early layer and attention_output of
the last one) and leaves the run untouched. With unit_locations it keeps only the chosen positions, here each
prompt's IO name. The collected tensors equal the hook points' values from `run_with_cache`, and are saved to
`--out`/activations.pt.

    python examples/05_collect_activations.py [--model ioi-gpt2] [--n 8] [--out out/]
"""

import argparse
import os

import torch

import hookvene as pv
from hookvene.experiments.ioi import make_ioi_dataset, tokenize_ioi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ioi-gpt2", help="bundled model name, local checkpoint dir, or 'gpt2'")
    p.add_argument("--n", type=int, default=8, help="number of IOI prompts")
    p.add_argument("--out", default="out", help="folder for activations.pt")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    _, tokenizer, model = pv.create_gpt2_lm(args.model)
    early, late = min(1, model.cfg.n_layers - 1), model.cfg.n_layers - 1

    # 1. Config with CollectIntervention
    config = pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(layer=early, component="block_output", intervention_type=pv.CollectIntervention),
        pv.RepresentationConfig(layer=late, component="attention_output", intervention_type=pv.CollectIntervention),
    ])
    intervenable = pv.IntervenableModel(config, model)

    # 2. Run and collect. The return value is ((original outputs, collected), outputs), as in pyvene.
    dataset = make_ioi_dataset(args.n, seed=0)  # mixed templates: right-padded to the longest prompt
    one = tokenizer(dataset.prompts[0], return_tensors="pt")
    (_, collected), _ = intervenable(base=one)

    # 3. Access collected activations: pyvene's flat list, one tensor per example per representation
    print(f"prompt 0: {dataset.prompts[0]!r}")
    print(f"Layer {early} block output shape: {tuple(collected[0].shape)}")
    print(f"Layer {late} attention output shape: {tuple(collected[1].shape)}")

    # A batch: the list holds representation 0's n examples, then representation 1's
    batch = tokenize_ioi(dataset, tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    (_, collected), outputs = intervenable(base=inputs)
    block_output, attention_output = torch.stack(collected[: args.n]), torch.stack(collected[args.n :])
    print(f"{args.n} prompts: {len(collected)} tensors, stacked {tuple(block_output.shape)} and "
          f"{tuple(attention_output.shape)}")

    # They are exactly the hook points' values, and the run itself was not changed
    names = [f"blocks.{early}.hook_resid_post", f"blocks.{late}.hook_attn_out"]
    reference, cache = model.run_with_cache(**inputs, names_filter=names)
    torch.testing.assert_close(block_output, cache[names[0]])
    torch.testing.assert_close(attention_output, cache[names[1]])
    torch.testing.assert_close(outputs.logits, reference.logits)
    print("equal to run_with_cache; outputs unchanged")

    # 4. Only some positions: each prompt's IO name (positions differ between templates), via return_dict
    at_io = [[p] for p in batch["io_pos"].tolist()]
    out = intervenable(base=inputs, unit_locations={"base": [at_io, at_io]}, return_dict=True)  # per representation
    io_block = torch.stack(out.collected_activations[: args.n])  # (n, 1 position, d_model)
    io_attn = torch.stack(out.collected_activations[args.n :])
    rows = torch.arange(args.n)
    torch.testing.assert_close(io_block[:, 0], cache[names[0]][rows, batch["io_pos"]])
    print(f"at the IO name only: {tuple(io_block.shape)} and {tuple(io_attn.shape)}")

    # How similar are the IO-name states of different prompts? (ABBA prompts name IO first, BABA second)
    v = torch.nn.functional.normalize(io_block[:, 0], dim=-1)
    sim = v @ v.T
    print("cosine similarity of the IO-name states, prompt 0 vs others: "
          + " ".join(f"{e.io}/{e.order}:{float(sim[0, i]):.2f}" for i, e in enumerate(dataset)))

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "activations.pt")
    torch.save({"prompts": dataset.prompts, "io_pos": batch["io_pos"], "attention_mask": inputs["attention_mask"],
                f"blocks.{early}.block_output": block_output, f"blocks.{late}.attention_output": attention_output,
                f"blocks.{early}.block_output@io": io_block}, path)
    print(f"saved: {path}")


if __name__ == "__main__":
    main()
