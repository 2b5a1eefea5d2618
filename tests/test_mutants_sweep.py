"""The sweep engine's helpers, with their expected values spelled out: position labels, the shared prefix a sweep
skips, and the last block run at the last position only (left-padded rows, whose pads it must not attend to).
Also the multi-process branch, with three threads standing in for three ranks. Written for mutants of
hookvene/experiments/sweep.py that survived the rest of the suite in a first, partial mutation run (see the
README's mutation-testing section)."""

import re

import pytest
import torch

from hookvene.experiments.metrics import logit_diff
from hookvene.experiments.patching import activation_patch
from hookvene.experiments.sweep import position_labels, shared_prefix
from tests.test_experiments import ANSWER, ATOL, WRONG, cell_by_cell, ids, make_model

# random tiny models: the clean-corrupted gap is small, and only the raw values are compared here
pytestmark = pytest.mark.filterwarnings("ignore::hookvene.experiments.results.UnreliableGapWarning")

METRIC_4 = logit_diff(torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11, 12]))  # for batches of 4


def pair(seed, at, **shape):
    """Clean ids (`ids(seed, **shape)`) and the corrupted copy: position `at` redrawn with seed + 1."""
    clean = ids(seed, **shape)
    corrupted = clean.clone()
    corrupted[:, at] = ids(seed + 1, **{**shape, "seq": 1})[:, 0]
    return clean, corrupted


@pytest.fixture(scope="module")
def model():
    return make_model()


class Words:
    """A stand-in tokenizer: token t decodes to " w<t>"."""

    def decode(self, tokens):
        return "".join(f" w{int(t)}" for t in torch.as_tensor(tokens).reshape(-1))


def test_position_labels_with_and_without_a_tokenizer(model):
    clean = {"input_ids": torch.tensor([[1, 2, 3], [1, 4, 3]])}
    corrupted = {"input_ids": torch.tensor([[1, 5, 6], [1, 7, 3]])}
    saved = model.tokenizer
    try:
        model.tokenizer = None
        assert position_labels(model, clean, corrupted) == ["0", "1", "2"]
        model.tokenizer = Words()
        assert position_labels(model, clean, corrupted) == ["0:w1", "1:(varies)", "2:(varies)"]
        one = {"input_ids": clean["input_ids"][:1]}
        assert position_labels(model, one, {"input_ids": corrupted["input_ids"][:1]}) == ["0:w1", "1:w2/w5",
                                                                                         "2:w3/w6"]
    finally:
        model.tokenizer = saved


def test_shared_prefix_counts_the_leading_positions_every_input_agrees_on():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = a.clone()
    b[0, 2] = 9
    assert shared_prefix({"input_ids": a}, {"input_ids": b}) == 2
    assert shared_prefix({"input_ids": a}, {"input_ids": a}) == 4
    mask = torch.ones_like(a)
    mask[1, 1] = 0
    assert shared_prefix({"input_ids": a, "attention_mask": mask}, {"input_ids": a}) == 1  # the masks differ at 1
    assert shared_prefix({"input_ids": a, "attention_mask": torch.ones_like(a)}, {"input_ids": a}) == 4  # all ones
    # a mask on one side only: the other counts as all ones
    assert shared_prefix({"input_ids": a}, {"input_ids": a, "attention_mask": torch.ones_like(a)}) == 4
    assert shared_prefix({"input_ids": a}, {"input_ids": a, "attention_mask": mask}) == 1
    pos = torch.arange(4).expand(2, 4)
    assert shared_prefix({"input_ids": a, "position_ids": pos}, {"input_ids": a, "position_ids": pos}) == 4
    moved = pos.clone()
    moved[1, 3] = 7
    assert shared_prefix({"input_ids": a, "position_ids": pos}, {"input_ids": a, "position_ids": moved}) == 3
    # position ids on one side only: not comparable, even when they are the ones a missing mask would stand for
    assert shared_prefix({"input_ids": a, "position_ids": pos}, {"input_ids": a}) == 0
    assert shared_prefix({"input_ids": a, "position_ids": torch.ones_like(a)}, {"input_ids": a}) == 0
    # inputs it cannot reason about, on either side or both: nothing is shared
    assert shared_prefix({"input_ids": a, "token_type_ids": a}, {"input_ids": a, "token_type_ids": a}) == 0
    assert shared_prefix({"input_ids": a, "token_type_ids": a}, {"input_ids": a}) == 0
    assert shared_prefix({"input_ids": a}, {"input_ids": a, "token_type_ids": a}) == 0


@pytest.mark.parametrize("kind", ["resid_pre", "heads", "mlp_out"])
def test_a_sweep_that_shares_no_position_reads_the_last_one_right(model, kind):
    """Corrupting position 0 leaves no shared prefix: the last block at the last position then starts its own key
    and value cache instead of extending the clean run's."""
    clean, corrupted = pair(23, at=0, seq=5)
    metric = logit_diff(ANSWER, WRONG)  # reads position -1: the last block runs there only
    ref = cell_by_cell(model, kind, clean, corrupted, metric)
    res = activation_patch(model, clean, corrupted, metric, kind=kind, batch_size=16)
    assert (res.values - ref).abs().max().item() <= ATOL


def test_record_cells_reads_each_cells_run_at_its_hooks_and_stops_after_their_block(model, capfd):
    """record_cells (path patching's first pass) against hooks written by hand: head h of blocks.0.attn.hook_z
    taken from the corrupted run, the clean run read at blocks.0.hook_attn_out; block 1 never runs, and nothing
    is printed (no progress bar)."""
    from hookvene.experiments.sweep import Cell, Patch, record, record_cells

    z, read = "blocks.0.attn.hook_z", "blocks.0.hook_attn_out"
    clean, corrupted = pair(25, at=2, batch=4, seq=5)
    metric = METRIC_4
    base = record(model, {"input_ids": clean}, metric, resume=True)
    source = record(model, {"input_ids": corrupted}, metric, [z])
    stored = {"corrupted": source.stored[z]}
    heads = [2, 0, 3]
    cells = [Cell((Patch(z, (None, h, None), store="corrupted"),)) for h in heads]
    calls = []
    handle = model.blocks[1].register_forward_hook(lambda *args: calls.append(1))
    try:
        capfd.readouterr()
        out = record_cells(model, cells, stored, [read], base.resume, 8)  # 8 rows: two cells a pass
        assert capfd.readouterr().err == ""
    finally:
        handle.remove()
    assert calls == []
    assert list(out) == [read] and out[read].shape == (3, 4, 5, model.cfg.d_model)
    for c, h in enumerate(heads):
        def swap(x, hook, h=h):
            x[:, :, h] = source.stored[z][:, :, h]
            return x
        with model.hooks([(z, swap)]):
            _, cache = model.run_with_cache(clean, names_filter=[read])
        assert (out[read][c] - cache[read]).abs().max().item() <= ATOL

    two = [Cell(cells[0].patches, 0), Cell(cells[1].patches, 2)]
    with pytest.raises(ValueError, match=r"record_cells needs one offset for all cells, got \[0, 2\]"):
        record_cells(model, two, stored, [read], base.resume, 8)


@pytest.mark.usefixtures("no_tqdm_monitor")
def test_a_progress_bar_counts_passes_only_when_asked(model, capfd):
    """The bar counts a sweep's forward passes ("chunks"), labelled with what the caller names (activation_patch:
    "patch <kind>"; run_cells alone: "sweep"); there is none unless asked for."""
    from hookvene.experiments.sweep import Cell, Patch, record, run_cells

    clean, corrupted = pair(35, at=2, batch=4, seq=5)
    metric = METRIC_4
    capfd.readouterr()
    activation_patch(model, clean, corrupted, metric, kind="heads", batch_size=8)
    assert capfd.readouterr().err == ""
    activation_patch(model, clean, corrupted, metric, kind="heads", batch_size=8, progress=True)
    assert re.search(r"patch heads: 100%\|.*\| 4/4 \[.*(chunk/s|s/chunk)\]", capfd.readouterr().err)

    z = "blocks.1.attn.hook_z"
    base = record(model, {"input_ids": clean}, metric, resume=True)
    stored = {"corrupted": record(model, {"input_ids": corrupted}, metric, [z]).stored[z]}
    cells = [Cell((Patch(z, (None, h, None), store="corrupted"),), 2) for h in range(3)]
    run_cells(model, cells, stored, metric, base.resume, batch_size=4, progress=True)
    assert re.search(r"sweep: 100%\|.*\| 3/3 \[.*(chunk/s|s/chunk)\]", capfd.readouterr().err)


def test_the_last_block_runs_at_the_last_position_only(model):
    """A metric that reads the last position: in the patched runs the last block's MLP sees that one position,
    unless the cell patches a head of that block (which then runs whole, on the 4 positions from the corrupted
    one on). The unpatched runs, recorded first, see all six."""
    clean, corrupted = pair(37, at=2, batch=4, seq=6)
    metric = METRIC_4
    seen = []
    handle = model.blocks[-1].mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        activation_patch(model, clean, corrupted, metric, kind="heads", batch_size=8)
    finally:
        handle.remove()
    # 8 rows a pass: two passes of layer-0 heads, then two of layer-1 heads
    assert seen == [6, 6, 1, 1, 4, 4]


def test_no_cells_give_no_values_and_identical_inputs_the_baseline(model):
    from hookvene.experiments.sweep import Resume, run_cells

    metric = logit_diff(ANSWER, WRONG)
    nothing = run_cells(model, [], {}, metric, Resume({0: torch.zeros(3, 5, model.cfg.d_model)}), batch_size=8)
    assert nothing.shape == (0,)
    clean = ids(51, batch=3, seq=5)
    res = activation_patch(model, clean, clean, metric, kind="resid_pre")
    assert res.clean == res.corrupted
    assert (res.values - res.corrupted).abs().max().item() <= ATOL


def heads_by_hand(model, clean, corrupted, metric):
    """activation_patch(kind="heads") written out: each head's z from the clean run patched into the corrupted
    run, the metric averaged over examples in float64."""
    n_layers, n_heads, n = model.cfg.n_layers, model.cfg.n_heads, clean.shape[0]
    _, cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("attn.hook_z"))
    grid = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for layer in range(n_layers):
        for h in range(n_heads):
            def patch(z, hook, h=h):
                z[:, :, h] = cache[hook.name][:, :, h]
                return z
            with torch.no_grad(), model.hooks([(f"blocks.{layer}.attn.hook_z", patch)]):
                logits = model(corrupted).logits
            grid[layer, h] = metric(logits, torch.arange(n)).double().mean()
    return grid


def test_a_float64_model_is_swept_in_float64():
    model = make_model().to(torch.float64)
    clean, corrupted = pair(52, at=2, seq=5)
    metric = logit_diff(ANSWER, WRONG)
    res = activation_patch(model, clean, corrupted, metric, kind="heads", batch_size=8)
    assert res.values.dtype == torch.float64
    # float32 anywhere on the way (a cell's mean, say) would leave errors of about 1e-7
    assert (res.values - heads_by_hand(model, clean, corrupted, metric)).abs().max().item() < 1e-12


def test_a_float32_sweep_stays_float32_whatever_the_metric_returns(model):
    from hookvene.experiments.sweep import Cell, Patch, record, run_cells

    clean, corrupted = pair(54, at=2, seq=5)
    metric = logit_diff(ANSWER, WRONG)

    def in_float64(logits, ex):  # a plain per-row metric that computes in float64
        return metric(logits, ex).double()

    z = "blocks.1.attn.hook_z"
    base = record(model, {"input_ids": corrupted}, metric, resume=True)
    stored = {"clean": record(model, {"input_ids": clean}, metric, [z]).stored[z]}
    cells = [Cell((Patch(z, (None, h, None), store="clean"),), 2) for h in range(4)]
    plain = run_cells(model, cells, stored, metric, base.resume, batch_size=8)
    double = run_cells(model, cells, stored, in_float64, base.resume, batch_size=8)
    assert plain.dtype == double.dtype == torch.float32
    assert (plain - double).abs().max().item() <= ATOL
    assert (plain - heads_by_hand(model, clean, corrupted, metric)[1]).abs().max().item() <= ATOL


def test_a_batch_metric_that_takes_the_example_index_gets_each_cells_rows(model):
    """metric(logits, example_idx) returning one number for the batch: called once per cell, with that cell's
    rows and their example indices, in example order."""
    clean, corrupted = pair(56, at=2, seq=5)
    per_row = logit_diff(ANSWER, WRONG)

    def batch_mean(logits, ex):
        rows = torch.arange(len(ex))
        return (logits[rows, -1, ANSWER[ex]] - logits[rows, -1, WRONG[ex]]).mean()

    a = activation_patch(model, clean, corrupted, batch_mean, kind="heads", batch_size=8).values
    b = activation_patch(model, clean, corrupted, per_row, kind="heads", batch_size=8).values
    assert (a - b).abs().max().item() <= ATOL


@pytest.mark.parametrize("attrs", [{}, {"has_lm_head": True}, {"can_resume": True}, {"can_resume": True,
                                                                                     "has_lm_head": False}])
def test_only_models_that_resume_and_have_an_lm_head_are_swept(attrs):
    """A model without either capability (or without the attribute at all: not a hookvene model) is refused by
    name before anything runs."""
    from hookvene.experiments.sweep import check_model

    class Foreign(torch.nn.Module):
        pass

    m = Foreign()
    for k, v in attrs.items():
        setattr(m, k, v)
    with pytest.raises(ValueError, match=r"^activation_patch works on hookvene's decoder-only language models "
                                         r"\(GPT-2, GPT-Neo, with their LM head\); got Foreign\. For other models"):
        check_model(m, "activation_patch")
    check_model(make_model(), "activation_patch")  # a hookvene GPT-2 passes


def test_sweep_inputs_warn_of_unknown_words_under_the_name_given():
    import warnings
    from types import SimpleNamespace

    from hookvene.experiments.sweep import sweep_inputs

    tok = SimpleNamespace(unk_token_id=3, unk_token="<unk>", bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = SimpleNamespace(tokenizer=tok)
    with pytest.warns(UserWarning, match=r"^the input contains '<unk>' \(id 3\)"):
        assert torch.equal(sweep_inputs(model, torch.tensor([[0, 3, 5]]))["input_ids"], torch.tensor([[0, 3, 5]]))
    with pytest.warns(UserWarning, match=r"^the prompt contains '<unk>'"):
        sweep_inputs(model, torch.tensor([[0, 3, 5]]), "the prompt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sweep_inputs(model, torch.tensor([[0, 4, 5]]))  # no unknown word
        sweep_inputs(SimpleNamespace(tokenizer=None), torch.tensor([[0, 3, 5]]))  # no tokenizer to ask


def test_record_reads_the_metric_of_the_examples_it_is_given(model):
    """`examples`: the metric's example index of each row (one rank's share of a batch); without `resume` the
    run keeps no states."""
    from hookvene.experiments.sweep import record

    clean = ids(58, batch=4, seq=5)
    metric = METRIC_4
    with torch.no_grad():
        logits = model(clean).logits
    by_hand = metric(logits, torch.arange(4))
    share = torch.tensor([3, 1])
    run = record(model, {"input_ids": clean[share]}, metric, ["blocks.0.hook_resid_post"], examples=share)
    assert run.metric == pytest.approx(float(by_hand[share].mean()), abs=ATOL)
    assert run.resume is None and list(run.stored) == ["blocks.0.hook_resid_post"]
    whole = record(model, {"input_ids": clean}, metric)
    assert whole.metric == pytest.approx(float(by_hand.mean()), abs=ATOL)
    assert whole.resume is None and whole.stored == {}


def test_resuming_after_position_0_needs_the_runs_keys_and_values():
    from hookvene.experiments.sweep import Resume

    resume = Resume({0: torch.zeros(2, 5, 8)})
    assert resume.prefix(0) is None  # nothing before position 0
    with pytest.raises(ValueError, match=r"^resuming after position 0 needs the unpatched run's keys and values "
                                         r"\(Resume\.kv\)$"):
        resume.prefix(2)


def test_a_patch_outside_every_block_is_refused_by_name():
    from hookvene.experiments.sweep import start_layer

    assert start_layer(["blocks.3.attn.hook_z", "blocks.1.hook_mlp_out", "blocks.12.hook_resid_pre"]) == 1
    with pytest.raises(ValueError, match=r"^sweep cells resume at a block, so every patch must be inside one; got "
                                         r"\['hook_embed', 'ln_final\.hook_normalized'\]$"):
        start_layer(["blocks.0.attn.hook_z", "hook_embed", "ln_final.hook_normalized"])


@pytest.fixture(scope="module")
def llama():
    import hookvene as pv
    from tests.test_llama import tiny

    return pv.from_pretrained(tiny("LlamaForCausalLM", vocab_size=101))


@pytest.mark.parametrize("arch, kind", [("gpt2", "resid_pre"), ("gpt2", "heads_pos"), ("gpt2", "mlp_out"),
                                        ("llama", "resid_pre")])
def test_left_padded_rows_read_at_the_last_position(model, llama, arch, kind):
    """Left padding and a metric at the last position: the sweep runs the last block at that position only, from a
    KV cache, and must mask the pads there as the full forward does; on a rotary model the earlier positions' keys
    are rotated by positions counted from each row's first real token, so the cache needs the mask too."""
    model = llama if arch == "llama" else model
    clean, corrupted = pair(21, at=4, seq=6)
    mask = torch.ones_like(clean)
    mask[0, :2] = 0  # row 0: two pads on the left
    mask[2, :1] = 0
    metric = logit_diff(ANSWER, WRONG)  # reads position -1
    c, x = {"input_ids": clean, "attention_mask": mask}, {"input_ids": corrupted, "attention_mask": mask}
    ref = cell_by_cell(model, kind, c, x, metric)
    res = activation_patch(model, c, x, metric, kind=kind, batch_size=16)
    assert (res.values - ref).abs().max().item() <= ATOL
    unmasked = activation_patch(model, {"input_ids": clean}, {"input_ids": corrupted}, metric, kind=kind)
    assert (unmasked.values - res.values).abs().max() > 1e-3  # the pads matter: a mask dropped would show


class ThreeRanks:
    """torch.distributed stood in for by three threads of this process, for the sweep engine's multi-process branch
    (the torchrun tests in test_distributed.py run it for real, in processes mutmut's in-process runs cannot see).
    Each thread runs the whole sweep on its own copy of the model as one rank; the collectives meet at a barrier."""

    world = 3

    def __init__(self):
        import threading

        # a rank that skips a collective (a bug) would leave the others waiting forever: fail after a minute
        self.barrier = threading.Barrier(self.world, timeout=60)
        self.slots = [None] * self.world
        self.local = threading.local()
        self.shares = []  # every sum_disjoint's per-rank tensors, as (rank 0's, rank 1's, rank 2's)
        self.checks = []  # check_same's keyword arguments, per call and rank
        self.costs = []  # the pass costs each rank hands to `assign`

    def rank(self):
        return self.local.rank

    def gather_objects(self, obj):
        self.slots[self.rank()] = obj
        self.barrier.wait()
        every = list(self.slots)
        self.barrier.wait()  # nobody writes the next gather's slot before everyone has read this one
        return every

    def sum_disjoint(self, t):
        every = self.gather_objects(t)
        # an all-reduce needs the same shape, dtype and device on every rank (it fails or hangs otherwise)
        assert len({(x.shape, x.dtype, x.device) for x in every}) == 1, [(x.shape, x.dtype) for x in every]
        if self.rank() == 0:
            self.shares.append(tuple(every))
        return every[0] + every[1] + every[2]

    def check_same(self, what, **values):
        self.checks.append((self.rank(), what, values))

    def run(self, monkeypatch, model, fn):
        """fn(model) on every rank, each with its own deepcopy of the model; the ranks' results, in rank order."""
        import copy
        import threading

        from hookvene import distributed
        from hookvene.experiments import sweep

        monkeypatch.setattr(sweep, "is_distributed", lambda: True)
        monkeypatch.setattr(sweep, "rank", self.rank)
        monkeypatch.setattr(sweep, "is_main", lambda: self.rank() == 0)
        def assign(costs):
            self.costs.append(list(costs))
            return distributed.assign(costs, world=self.world)

        monkeypatch.setattr(sweep, "assign", assign)
        monkeypatch.setattr(sweep, "check_same", self.check_same)
        monkeypatch.setattr(sweep, "gather_objects", self.gather_objects)
        monkeypatch.setattr(sweep, "sum_disjoint", self.sum_disjoint)
        results, errors = [None] * self.world, []

        def rank_main(r, m):
            self.local.rank = r
            try:
                results[r] = fn(m)
            except BaseException as e:  # noqa: BLE001 (re-raised below, in the test's thread)
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=rank_main, args=(r, copy.deepcopy(model))) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def disjoint_shares(shares):
    """Each entry filled by exactly one rank: the ranks split the work instead of repeating it."""
    nonzero = torch.stack([s != 0 for s in shares]).sum(0)
    return bool((nonzero <= 1).all()) and all(bool((s != 0).any()) for s in shares)


# A pass costs (blocks it runs) x (positions it recomputes) per cell. 2 blocks, 6 positions, position 3 corrupted
# (0-2 are shared). heads: 8 cells, all recomputing 3 positions; a layer-0 cell runs 2 blocks, a layer-1 cell 1.
# resid_pre: a cell per layer and position p >= 3, recomputing positions p.. (its offset); one pass per offset.
THREE_RANK_SWEEPS = [
    ("heads", 8, 8, [2 * 2 * 3] * 2 + [2 * 1 * 3] * 2),  # 8 rows a pass: 2 cells of 4 examples
    ("heads", 2, 8, [2 * 3] * 4 + [1 * 3] * 4),  # fewer rows than examples: still one cell a pass
    ("resid_pre", 8, 6, [(2 + 1) * 3, (2 + 1) * 2, (2 + 1) * 1]),
]


@pytest.mark.parametrize("kind, batch_size, n_cells, costs", THREE_RANK_SWEEPS)
def test_three_ranks_split_an_activation_patch_and_return_its_values(model, monkeypatch, kind, batch_size, n_cells,
                                                                     costs):
    clean, corrupted = pair(31, at=3, batch=4, seq=6)
    metric = METRIC_4
    alone = activation_patch(model, clean, corrupted, metric, kind=kind, batch_size=batch_size).values
    group = ThreeRanks()
    ranks = group.run(monkeypatch, model,
                      lambda m: activation_patch(m, clean, corrupted, metric, kind=kind, batch_size=batch_size).values)
    for values in ranks:
        assert torch.equal(values, alone)  # the same arithmetic, split: bitwise equal
    (shares,) = group.shares
    assert disjoint_shares(shares)
    assert group.costs == [costs] * 3
    assert [c[2] for c in group.checks] == [dict(cells=n_cells, examples=4, positions=6, passes=len(costs))] * 3
    assert {c[1] for c in group.checks} == {"a sweep"}


@pytest.fixture
def no_tqdm_monitor(monkeypatch):
    """tqdm starts a monitor thread with its first visible bar, which lives on and takes tqdm's lock every 10 s: a
    process forked while it holds the lock (mutmut forks one per mutant) hangs at its first bar. Not for bars
    that only a test looks at need none."""
    import tqdm

    monkeypatch.setattr(tqdm.std.tqdm, "monitor_interval", 0)


@pytest.mark.usefixtures("no_tqdm_monitor")
def test_only_the_main_rank_shows_the_progress_bar(model, monkeypatch, capfd):
    clean, corrupted = pair(33, at=3, batch=4, seq=6)
    metric = METRIC_4
    capfd.readouterr()
    ThreeRanks().run(monkeypatch, model, lambda m: activation_patch(m, clean, corrupted, metric, kind="heads",
                                                                    batch_size=8, progress=True))
    assert len(re.findall(r"patch heads:\s+0%\|", capfd.readouterr().err)) == 1
    ThreeRanks().run(monkeypatch, model, lambda m: activation_patch(m, clean, corrupted, metric, kind="heads",
                                                                    batch_size=8))
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("receivers", ["logits", [("blocks.1.attn.hook_q", 0), ("blocks.1.attn.hook_v", 1)]])
def test_three_ranks_split_a_path_patch_and_return_its_values(model, monkeypatch, receivers):
    """Path patching records the senders' patched runs at the receivers (`record_cells`, the ranks' recordings
    summed) before running the receivers' cells."""
    from hookvene.experiments.path_patching import path_patch

    clean, corrupted = pair(41, at=2, batch=4, seq=5)
    metric = METRIC_4
    alone = path_patch(model, clean, corrupted, metric, receivers=receivers, batch_size=8).values
    group = ThreeRanks()
    ranks = group.run(monkeypatch, model,
                      lambda m: path_patch(m, clean, corrupted, metric, receivers=receivers, batch_size=8).values)
    for values in ranks:
        assert torch.equal(values, alone)
    assert all(disjoint_shares(s) for s in group.shares)
    assert len(group.shares) == (1 if receivers == "logits" else 1 + 2)  # the recordings: one per receiver hook


def test_ranks_without_a_pass_still_join_the_recordings_sum(model, monkeypatch):
    """Two senders, 8 rows a pass: path patching's recording is one pass, so two of the three ranks run nothing
    and must contribute zeros of the recording's shape and dtype (float64 here) to the all-reduce."""
    from hookvene.experiments.path_patching import path_patch

    model = make_model().to(torch.float64)
    clean, corrupted = pair(43, at=2, batch=4, seq=5)
    metric = METRIC_4
    receivers, senders = [("blocks.1.attn.hook_k", 2)], [(0, 1), (0, 3)]
    alone = path_patch(model, clean, corrupted, metric, receivers=receivers, senders=senders, batch_size=8).values
    group = ThreeRanks()
    ranks = group.run(monkeypatch, model, lambda m: path_patch(m, clean, corrupted, metric, receivers=receivers,
                                                              senders=senders, batch_size=8).values)
    for values in ranks:  # (heads that are not senders are NaN)
        torch.testing.assert_close(values, alone, rtol=0, atol=0, equal_nan=True)
    recording = group.shares[0]
    assert [bool((s != 0).any()) for s in recording].count(True) == 1  # one rank ran the one pass
    assert {s.dtype for s in recording} == {torch.float64}
