"""Loading lean and placing models: stored dtypes kept, sharded = unsharded, `device=` and accelerate's `device_map=`
(on CPU here: "auto", a dict, and accelerate's device-moving hooks forced onto every block, under which hooks,
caches, interventions and sweeps must give the same numbers). The multi-GPU command is in the README's Scaling."""

import json
import sys

import pytest
import torch

import hookvene as pv
from hookvene.experiments import activation_patch
from hookvene.experiments.metrics import logit_diff
from hookvene.loading.common import read_checkpoint_dir
from tests.helpers import save_checkpoint, tiny_gpt2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tiny_gpt2(None, n_layer=3), None, str(tmp_path_factory.mktemp("place")))


IDS = torch.tensor([[3, 14, 15, 9, 2, 6], [5, 3, 5, 8, 9, 7]])


def test_bf16_checkpoint_loads_as_bf16_and_dtype_converts(tmp_path):
    hf = tiny_gpt2(None).to(torch.bfloat16)
    path = save_checkpoint(hf, None, str(tmp_path))
    model = pv.from_pretrained(path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.embed.weight, hf.transformer.wte.weight)  # the stored values, not a round trip
    half = pv.from_pretrained(path, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert torch.equal(half.blocks[1].mlp.W_in, hf.transformer.h[1].mlp.c_fc.weight.to(torch.float16))
    _, state = read_checkpoint_dir(path, dtype=torch.float16)  # converted while read, tensor by tensor
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float16}


def test_eight_shards_load_equal_to_one_file(ckpt, tmp_path):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(ckpt)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 8
    one, sharded = pv.from_pretrained(ckpt), pv.from_pretrained(str(tmp_path))
    for (name, a), (_, b) in zip(one.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_device_is_where_the_weights_are_read(ckpt):
    model = pv.from_pretrained(ckpt, device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="not both"):
        pv.from_pretrained(ckpt, device="cpu", device_map="auto")


def every_module_on_cpu(model) -> dict[str, str]:
    """A device map naming each top-level weight-holding module and each block (as one would across GPUs)."""
    names = [n for n, m in model.named_children() if n != "blocks" and any(True for _ in m.parameters())]
    return {**{n: "cpu" for n in names}, **{f"blocks.{i}": "cpu" for i in range(model.cfg.n_layers)}}


def test_device_map_auto_and_dict(ckpt):
    pytest.importorskip("accelerate")
    plain = pv.from_pretrained(ckpt)
    want = plain(IDS).logits
    auto = pv.from_pretrained(ckpt, device_map="auto")
    assert set(auto.hf_device_map.values()) == {"cpu"}
    torch.testing.assert_close(auto(IDS).logits, want, atol=0, rtol=0)
    mapped = pv.from_pretrained(ckpt, device_map=every_module_on_cpu(plain))
    torch.testing.assert_close(mapped(IDS).logits, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="blocks.2"):  # accelerate names the modules left without a device
        pv.from_pretrained(ckpt, device_map={k: v for k, v in every_module_on_cpu(plain).items() if k != "blocks.2"})
    with pytest.raises(ValueError, match="tied weights are one tensor"):  # GPT-2's unembedding is the embedding
        pv.from_pretrained(ckpt, device_map={**every_module_on_cpu(plain), "unembed": "cuda:1"})
    with pytest.raises(ValueError, match="device_map must be a dict"):
        pv.from_pretrained(ckpt, device_map="everywhere")


def test_missing_accelerate_is_a_clear_error(ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(ImportError, match="needs the `accelerate` package"):
        pv.from_pretrained(ckpt, device_map="auto")


def test_hooks_caches_interventions_and_sweeps_through_accelerate_device_hooks(ckpt):
    """accelerate's AlignDevicesHook on every block (forced, as it is across GPUs) moves each block's inputs to its
    device; every hookvene feature must still compute the same numbers."""
    accelerate = pytest.importorskip("accelerate")
    plain = pv.from_pretrained(ckpt)
    placed = accelerate.dispatch_model(pv.from_pretrained(ckpt), every_module_on_cpu(plain), force_hooks=True)
    assert hasattr(placed.blocks[0], "_hf_hook")
    for model in (plain, placed):
        model.reset_hooks()
    _, want = plain.run_with_cache(IDS)
    _, got = placed.run_with_cache(IDS, device="cpu")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)
    config = {"layer": 2, "component": "block_output"}  # a source read at one block, written at the same in the base
    runs = [pv.IntervenableModel(config, m)({"input_ids": IDS[:1]}, [{"input_ids": IDS[1:]}],
                                            unit_locations={"sources->base": 3})[1].logits for m in (plain, placed)]
    torch.testing.assert_close(runs[1], runs[0], atol=0, rtol=0)
    metric = logit_diff(torch.tensor([3, 4]), torch.tensor([5, 6]))
    sweeps = [activation_patch(m, IDS, IDS.flip(0), metric, kind="heads").values for m in (plain, placed)]
    torch.testing.assert_close(sweeps[1], sweeps[0], atol=0, rtol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (the README's Scaling gives the command)")
def test_blocks_across_two_gpus(ckpt):
    """Run on a machine with 2+ GPUs: `pytest tests/test_placement.py -k gpus`."""
    pytest.importorskip("accelerate")
    plain = pv.from_pretrained(ckpt)
    device_map = {**every_module_on_cpu(plain), "embed": 0, "pos_embed": 0, "blocks.0": 0, "blocks.1": 1,
                  "blocks.2": 1, "ln_final": 1, "unembed": 0}
    placed = pv.from_pretrained(ckpt, device_map=device_map)
    assert placed.blocks[0].attn.qkv.weight.device.index == 0 and placed.blocks[2].attn.qkv.weight.device.index == 1
    torch.testing.assert_close(placed(IDS).logits.cpu(), plain(IDS).logits, atol=1e-4, rtol=0)
    _, cache = placed.run_with_cache(IDS, device="cpu")  # gathered from both GPUs
    assert {t.device.type for t in cache.values()} == {"cpu"}
    seen = {}
    placed.run_with_hooks(IDS, fwd_hooks=[(f"blocks.{i}.hook_resid_post", lambda x, hook: seen.update(
        {hook.name: x.device.index})) for i in range(3)])
    assert seen == {"blocks.0.hook_resid_post": 0, "blocks.1.hook_resid_post": 1, "blocks.2.hook_resid_post": 1}
    # an interchange whose source is read on GPU 0 (block 0) and written on GPU 1 (block 1's input)
    source = placed.run_with_cache(IDS[1:], names_filter=["blocks.0.hook_resid_post"])[1]["blocks.0.hook_resid_post"]
    runs = []
    for m, s in ((plain, source.cpu()), (placed, source)):
        iv = pv.IntervenableModel({"layer": 1, "component": "block_input"}, m)
        given = {iv.sorted_keys[0]: s[:, 3:4]}  # (batch, units, d_model): position 3
        runs.append(iv({"input_ids": IDS[:1]}, unit_locations={"base": 3}, activations_sources=given)[1].logits.cpu())
    torch.testing.assert_close(runs[1], runs[0], atol=1e-4, rtol=0)
