"""collect_activations: rows equal to run_with_cache, forwards cut after the last hook, bounded shards, resume
without duplicates, and the reader the SAE trainer uses. (Two ranks under torchrun: tests/test_distributed.py.)"""

import json

import pytest
import torch

import hookvene as pv
from hookvene.collect import ActivationShards, collect_activations
from tests.helpers import tiny_gpt2

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]


@pytest.fixture(scope="module")
def model():
    return pv.from_pretrained(tiny_gpt2(None, n_layer=3))


def prompts(n: int = 11, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 101, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def expected(model, data, hooks=HOOKS) -> dict[str, torch.Tensor]:
    """Each prompt alone through run_with_cache, rows in prompt order."""
    rows: dict[str, list] = {h: [] for h in hooks}
    for p in data:
        _, cache = model.run_with_cache(torch.tensor([p]), names_filter=hooks)
        for h in hooks:
            rows[h].append(cache[h][0])
    return {h: torch.cat(v) for h, v in rows.items()}


def read_all(store: ActivationShards) -> dict[str, torch.Tensor]:
    shards = list(store)
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


def test_rows_equal_run_with_cache_padding_left_out(model, tmp_path):
    data = prompts()
    store = collect_activations(model, data, HOOKS, batch_size=4, out=str(tmp_path), rows_per_shard=10)
    got, want = read_all(store), expected(model, data)
    n_rows = sum(len(p) for p in data)
    assert len(store) == n_rows and got["example"].shape == (n_rows,)
    for h in HOOKS:
        torch.testing.assert_close(got[h], want[h], atol=1e-5, rtol=0)
    assert got["blocks.1.attn.hook_z"].shape[1:] == (4, 8)  # (rows, head, d_head)
    assert got["example"].tolist() == [i for i, p in enumerate(data) for _ in p]
    assert got["position"].tolist() == [j for p in data for j in range(len(p))]
    assert len(store.shards) == 3  # 3 batches, each past 10 rows: one shard per batch
    info = json.loads((tmp_path / "collect.json").read_text())
    assert info["shapes"] == {"blocks.0.hook_resid_post": [32], "blocks.1.attn.hook_z": [4, 8]}


def test_forward_stops_after_the_last_needed_hook(model, tmp_path):
    fired = []
    model.add_hook("blocks.1.hook_resid_post", lambda x, hook: fired.append(hook.name))
    try:
        collect_activations(model, torch.randint(0, 101, (6, 5)), ["blocks.1.attn.hook_z"], batch_size=3,
                            out=str(tmp_path))
        assert fired == []  # blocks.1's MLP and everything after never ran
        model(torch.randint(0, 101, (1, 5)))
        assert fired == ["blocks.1.hook_resid_post"]  # the probe itself works
    finally:
        model.reset_hooks()


def test_resume_after_an_interruption_writes_no_row_twice(model, tmp_path):
    data = prompts(13, seed=1)

    class Stop(Exception):
        pass

    def interrupted():
        for i, p in enumerate(data):
            if i == 9:
                raise Stop("interrupted after 9 prompts")
            yield p

    with pytest.raises(Stop, match="interrupted"):
        collect_activations(model, interrupted(), HOOKS, batch_size=2, out=str(tmp_path), rows_per_shard=8)
    before = len(ActivationShards(str(tmp_path)).shards)
    assert 0 < before
    store = collect_activations(model, iter(data), HOOKS, batch_size=2, out=str(tmp_path), rows_per_shard=8)
    got = read_all(store)
    assert got["example"].tolist() == [i for i, p in enumerate(data) for _ in p]  # each prompt once, in order
    torch.testing.assert_close(got[HOOKS[0]], expected(model, data, HOOKS[:1])[HOOKS[0]], atol=1e-5, rtol=0)
    again = collect_activations(model, data, HOOKS, batch_size=2, out=str(tmp_path), rows_per_shard=8)
    assert again.shards == store.shards  # everything was on disk: nothing recomputed


def test_other_settings_on_an_existing_folder_are_refused(model, tmp_path):
    collect_activations(model, prompts(3), HOOKS, batch_size=2, out=str(tmp_path))
    with pytest.raises(ValueError, match="holds a collection made with other settings"):
        collect_activations(model, prompts(3), HOOKS, batch_size=3, out=str(tmp_path))


def test_dtype_strings_and_reader_batches(tmp_path):
    from tests.helpers import make_tokenizer

    tok = make_tokenizer()
    model = pv.from_pretrained(tiny_gpt2(tok, n_layer=2), tokenizer=tok)
    texts = ["The capital of Spain is Madrid.", "Hello world.", "John and Mary went to the store."]
    store = collect_activations(model, texts, ["blocks.1.hook_resid_pre"], batch_size=2, out=str(tmp_path),
                                dtype=torch.bfloat16)
    ids = [model.to_tokens(t)[0] for t in texts]  # BOS prepended, as to_tokens does
    assert len(store) == sum(len(i) for i in ids)
    got = read_all(store)["blocks.1.hook_resid_pre"]
    assert got.dtype == torch.bfloat16
    _, cache = model.run_with_cache(ids[0][None])
    torch.testing.assert_close(got[:len(ids[0])], cache["blocks.1.hook_resid_pre"][0].bfloat16())
    batches = list(store.batches("blocks.1.hook_resid_pre", batch_size=4, shuffle=True))
    assert sum(b.shape[0] for b in batches) == len(store) and all(b.shape[0] == 4 for b in batches[:-1])
    with pytest.raises(ValueError, match="was not collected here"):
        next(store.batches("blocks.0.hook_resid_pre", batch_size=4))


def test_bad_requests(model, tmp_path):
    with pytest.raises(ValueError, match="no hook points"):
        collect_activations(model, prompts(2), ["blocks.9.hook_resid_post"], out=str(tmp_path))
    with pytest.raises(ValueError, match="not one row per token"):
        collect_activations(model, prompts(2), ["blocks.0.attn.hook_pattern"], out=str(tmp_path))
    with pytest.raises(ValueError, match="at least one hook name"):
        collect_activations(model, prompts(2), [], out=str(tmp_path))
    with pytest.raises(ValueError, match="non-empty sequence of token ids"):
        collect_activations(model, [[1, 2], []], HOOKS, out=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="holds no collect.json"):
        ActivationShards(str(tmp_path / "nothing"))


def test_models_it_does_not_take(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = pv.from_pretrained(T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24,
                                                                num_layers=1, num_heads=4)))
    with pytest.raises(ValueError, match="needs decoder inputs too"):
        collect_activations(t5, prompts(2), ["encoder.blocks.0.hook_resid_post"], out=str(tmp_path))
    gru = pv.create_gru_lm(pv.GRUConfig(n_layer=1, h_dim=8, vocab_size=101, include_emb=True))[-1]
    with pytest.raises(ValueError, match="fires once per time step"):
        collect_activations(gru, prompts(2), ["layers.0.hook_hidden"], out=str(tmp_path / "gru"))
