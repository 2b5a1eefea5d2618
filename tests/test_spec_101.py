"""Every GPT-2 cell of the "pyvene 101/102" seed (/work/shared/spec/000_e4b73ec920869f23.txt), ported.

The cell code is kept as in the seed, with `import hookvene as pv` for pyvene, `pv.create_gpt2()` ->
`pv.create_gpt2(gpt2_dir)` (a local 12-layer, 256-wide, 16-head random GPT-2), `"./tmp/"` -> `tmp_path`, and
circuitsvis replaced by a shape check. After each cell, its result is checked against a hand-written oracle built
with `run_with_cache` / `run_with_hooks`. GRU, GPT-Neo generation and T5 cells are tested elsewhere."""

import json

import torch

import hookvene as pv
from tests.helpers import close, differs


def hidden(gpt2, inputs, hooks=()):
    """Oracle: the last hidden state of a run with our own hook functions."""
    return gpt2.run_with_hooks(inputs["input_ids"], fwd_hooks=list(hooks)).last_hidden_state


def acts(gpt2, inputs, hooks=()):
    with gpt2.hooks(list(hooks)):
        return gpt2.run_with_cache(inputs["input_ids"])[1]


def put(pos, value, dims=None):
    """Oracle hook for a (batch, pos, d) site: x[:, pos, dims] = value."""
    def fn(x, _):
        x = x.clone()
        if dims is None:
            x[:, pos] = value
        else:
            x[:, pos, dims] = value
        return x
    return fn


RESID = "blocks.{}.hook_resid_post"
MLP_OUT = "blocks.{}.hook_mlp_out"


# -- Get Attention Weights ------------------------------------------------------------------------------------------


def test_get_attention_weights(gpt2_dir):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    pv_gpt2 = pv.IntervenableModel({
        "layer": 3, "component": "attention_weight", "unit": "h",
        "intervention_type": pv.CollectIntervention}, model=gpt2)

    base = "When John and Mary went to the shops, Mary gave the book to"
    collected_attn_w = pv_gpt2(
        base = tokenizer(base, return_tensors="pt"
        ), unit_locations={"base": [3, 6, 7, 9]}
    )[0][-1][0]

    # attention_patterns(tokens=..., attention=collected_attn_w) from circuitsvis -> a shape check: circuitsvis
    # takes (n_heads, dest, src); pyvene's collected list holds one tensor per example, so [0] is example 0's
    tokens = [" "+t.lstrip("Ġ") for t in tokenizer.tokenize(base)]
    n = len(tokens)
    assert collected_attn_w.shape == (4, n, n)
    pattern = acts(gpt2, tokenizer(base, return_tensors="pt"))["blocks.3.attn.hook_pattern"][0]
    close(collected_attn_w, pattern[[3, 6, 7, 9]])
    close(collected_attn_w.sum(-1), torch.ones(4, n))
    assert torch.all(collected_attn_w.triu(1) == 0)  # causal


# -- Set Activation to Zeros -------------------------------------------------------------------------------------------


def test_set_activation_to_zeros(gpt2_dir):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    # define the component to zero-out
    pv_gpt2 = pv.IntervenableModel({
        "layer": 0, "component": "mlp_output",
        "source_representation": torch.zeros(gpt2.config.n_embd)
    }, model=gpt2)
    # run the intervened forward pass
    intervened_outputs = pv_gpt2(
        base = tokenizer("The capital of Spain is", return_tensors="pt"),
        # we define the intervening token dynamically
        unit_locations={"base": 3}
    )

    base = tokenizer("The capital of Spain is", return_tensors="pt")
    out = intervened_outputs[1].last_hidden_state
    assert intervened_outputs[0] is None
    close(out, hidden(gpt2, base, [(MLP_OUT.format(0), put(3, 0.0))]))
    # mlp_output at position 3 really is zero: resid_post == resid_mid there (via an oracle cache)
    clean = hidden(gpt2, base)
    close(out[:, :3], clean[:, :3])
    differs(out[:, 3:], clean[:, 3:])
    cache = acts(gpt2, base, [(MLP_OUT.format(0), put(3, 0.0))])
    close(cache["blocks.0.hook_resid_post"][:, 3], cache["blocks.0.hook_resid_mid"][:, 3])


# -- Set Activations to Zeros with Subspaces ---------------------------------------------------------------------------


def test_set_activations_to_zeros_with_subspaces(gpt2_dir, tmp_path):
    # built-in helper to get a HuggingFace model
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)
    # create with dict-based config
    pv_config = pv.IntervenableConfig({
      "layer": 0, "component": "mlp_output"})
    #initialize model
    pv_gpt2 = pv.IntervenableModel(pv_config, model=gpt2)
    # run an intervened forward pass
    intervened_outputs = pv_gpt2(
      # the intervening base input
      base=tokenizer("The capital of Spain is", return_tensors="pt"),
      # the location to intervene at (3rd token)
      unit_locations={"base": 3},
      # the individual dimensions targetted
      subspaces=[10,11,12],
      source_representations=torch.zeros(gpt2.config.n_embd)
    )
    # sharing
    pv_gpt2.save(str(tmp_path))

    base = tokenizer("The capital of Spain is", return_tensors="pt")
    hook = (MLP_OUT.format(0), put(3, 0.0, [10, 11, 12]))
    close(intervened_outputs[1].last_hidden_state, hidden(gpt2, base, [hook]))
    # only dims 10-12 of position 3 changed at the site
    cache, clean = acts(gpt2, base, [hook]), acts(gpt2, base)
    diff = (cache[MLP_OUT.format(0)] - clean[MLP_OUT.format(0)]).abs()
    assert diff[0, 3, [10, 11, 12]].gt(0).all()
    diff[0, 3, [10, 11, 12]] = 0
    assert diff.max() == 0
    assert (tmp_path / "config.json").is_file()


# -- Interchange Interventions ---------------------------------------------------------------------------------------


def test_interchange_intervention(gpt2_dir):
    # built-in helper to get a HuggingFace model
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)
    # create with dict-based config
    pv_config = pv.IntervenableConfig({
      "layer": 0,
      "component": "mlp_output"},
      intervention_types=pv.VanillaIntervention
    )
    #initialize model
    pv_gpt2 = pv.IntervenableModel(
      pv_config, model=gpt2)
    # run an interchange intervention
    intervened_outputs = pv_gpt2(
      # the base input
      base=tokenizer(
        "The capital of Spain is",
        return_tensors = "pt"),
      # the source input
      sources=tokenizer(
        "The capital of Italy is",
        return_tensors = "pt"),
      # the location to intervene at (3rd token)
      unit_locations={"sources->base": 3},
      # the individual dimensions targeted
      subspaces=[10,11,12]
    )

    base = tokenizer("The capital of Spain is", return_tensors="pt")
    src = acts(gpt2, tokenizer("The capital of Italy is", return_tensors="pt"))[MLP_OUT.format(0)]
    hook = (MLP_OUT.format(0), put(3, src[:, 3, [10, 11, 12]], [10, 11, 12]))
    out = intervened_outputs[1].last_hidden_state
    close(out, hidden(gpt2, base, [hook]))
    differs(out, hidden(gpt2, base))
    site, clean = acts(gpt2, base, [hook])[MLP_OUT.format(0)], acts(gpt2, base)[MLP_OUT.format(0)]
    changed = (site != clean).nonzero().tolist()
    assert {(p, d) for _, p, d in changed} == {(3, 10), (3, 11), (3, 12)}


# -- Intervention Configuration -------------------------------------------------------------------------------------


def test_intervention_config(gpt2_dir, capsys):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)
    # standalone configuration object
    config = pv.IntervenableConfig([
        {
            "layer": _,
            "component": "mlp_output",
            "source_representation": torch.zeros(
                gpt2.config.n_embd)
        } for _ in range(4)],
        mode="parallel"
    )
    # this object is serializable
    print(config)
    pv_gpt2 = pv.IntervenableModel(config, model=gpt2)

    intervened_outputs = pv_gpt2(
        base = tokenizer("The capital of Spain is", return_tensors="pt"),
        unit_locations={"base": 3}
    )

    printed = json.loads(capsys.readouterr().out)  # print(config) is JSON
    assert len(printed["representations"]) == 4
    assert printed["mode"] == "parallel"
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    expect = hidden(gpt2, base, [(MLP_OUT.format(i), put(3, 0.0)) for i in range(4)])
    close(intervened_outputs[1].last_hidden_state, expect)


# -- Addition Intervention -------------------------------------------------------------------------------------------


def test_addition_intervention(gpt2_dir):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    config = pv.IntervenableConfig({
        "layer": 0,
        "component": "mlp_input"},
        pv.AdditionIntervention
    )

    pv_gpt2 = pv.IntervenableModel(config, model=gpt2)

    torch.manual_seed(1)
    intervened_outputs = pv_gpt2(
        base = tokenizer(
            "The Space Needle is in downtown",
            return_tensors="pt"
        ),
        unit_locations={"base": [0, 1, 2, 3]},
        source_representations = torch.rand(gpt2.config.n_embd)
    )

    torch.manual_seed(1)
    v = torch.rand(gpt2.config.n_embd)
    base = tokenizer("The Space Needle is in downtown", return_tensors="pt")

    def add(x, _):
        x = x.clone()
        x[:, :4] += v
        return x

    out = intervened_outputs[1].last_hidden_state
    close(out, hidden(gpt2, base, [("blocks.0.ln2.hook_normalized", add)]))
    clean = hidden(gpt2, base)
    differs(out[:, :4], clean[:, :4])
    differs(out[:, 4:], clean[:, 4:])


# -- Trainable Intervention --------------------------------------------------------------------------------------------


def test_trainable_intervention(gpt2_dir):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    das_config = pv.IntervenableConfig({
        "layer": 8,
        "component": "block_output",
        "low_rank_dimension": 1},
        # this is a trainable low-rank rotation
        pv.LowRankRotatedSpaceIntervention
    )

    das_gpt2 = pv.IntervenableModel(das_config, model=gpt2)

    last_hidden_state = das_gpt2(
        base = tokenizer(
            "The capital of Spain is",
            return_tensors="pt"
        ),
        sources = tokenizer(
            "The capital of Italy is",
            return_tensors="pt"
        ),
        unit_locations={"sources->base": 3}
    )[-1].last_hidden_state[:,-1]

    # golden counterfacutual label as Rome
    label = tokenizer.encode(
        " Rome", return_tensors="pt")
    logits = torch.matmul(
        last_hidden_state, gpt2.wte.weight.t())

    m = torch.nn.CrossEntropyLoss()
    loss = m(logits, label.view(-1))
    loss.backward()

    params = das_gpt2.get_trainable_parameters()
    assert len(params) == 1 and params[0].shape == (256, 1)
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0
    assert torch.isfinite(loss)


# -- Activation Collection -------------------------------------------------------------------------------------------


def test_activation_collection(gpt2_dir):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    config = pv.IntervenableConfig({
        "layer": 10,
        "component": "block_output",
        "intervention_type": pv.CollectIntervention}
    )

    pv_gpt2 = pv.IntervenableModel(
        config, model=gpt2)

    collected_activations = pv_gpt2(
        base = tokenizer(
            "The capital of Spain is",
            return_tensors="pt"
        ), unit_locations={"sources->base": 3}
    )[0][-1]

    # pyvene's list holds one tensor per example (it extends the list with the batch tensor)
    assert len(collected_activations) == 1
    assert collected_activations[0].shape == (1, 256)
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    close(collected_activations[0], acts(gpt2, base)[RESID.format(10)][0, [3]])


def test_activation_collection_downstream_of_an_intervention(gpt2_dir):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    config = pv.IntervenableConfig({
        "layer": 8,
        "component": "block_output",
        "intervention_type": pv.VanillaIntervention}
    )

    config.add_intervention({
        "layer": 10,
        "component": "block_output",
        "intervention_type": pv.CollectIntervention})

    pv_gpt2 = pv.IntervenableModel(
        config, model=gpt2)

    collected_activations = pv_gpt2(
        base = tokenizer(
            "The capital of Spain is",
            return_tensors="pt"
        ),
        sources = [tokenizer(
            "The capital of Italy is",
            return_tensors="pt"
        ), None], unit_locations={"sources->base": 3}
    )[0][-1]

    base = tokenizer("The capital of Spain is", return_tensors="pt")
    src = acts(gpt2, tokenizer("The capital of Italy is", return_tensors="pt"))[RESID.format(8)]
    expect = acts(gpt2, base, [(RESID.format(8), put(3, src[:, 3]))])[RESID.format(10)][0, [3]]
    assert len(collected_activations) == 1
    close(collected_activations[0], expect)
    differs(collected_activations[0], acts(gpt2, base)[RESID.format(10)][0, [3]])


# -- Intervene on a Single Neuron ------------------------------------------------------------------------------------


def test_intervene_single_neuron(gpt2_dir):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    config = pv.IntervenableConfig({
        "layer": 8,
        "component": "head_attention_value_output",
        "unit": "h.pos",
        "intervention_type": pv.CollectIntervention}
    )

    pv_gpt2 = pv.IntervenableModel(
        config, model=gpt2)

    collected_activations = pv_gpt2(
        base = tokenizer(
            "The capital of Spain is",
            return_tensors="pt"
        ),
        unit_locations={
            # GET_LOC is a helper.
            # (3,3) means head 3 position 3
            "base": pv.GET_LOC((3,3))
        },
        # the notion of subspace is used to target neuron 0.
        subspaces=[0]
    )[0][-1]

    base = tokenizer("The capital of Spain is", return_tensors="pt")
    z = acts(gpt2, base)["blocks.8.attn.hook_z"]  # batch pos head d_head
    assert len(collected_activations) == 1
    assert collected_activations[0].shape == (1, 1, 1)  # (heads, positions, dims) of the one example
    close(collected_activations[0].flatten(), z[0, 3, 3, [0]])


# -- Add New Intervention Type ---------------------------------------------------------------------------------------


def test_add_new_intervention_type(gpt2_dir):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    class MultiplierIntervention(
      pv.ConstantSourceIntervention):
        def __init__(self, **kwargs):
            super().__init__()
        def forward(
        self, base, source=None, subspaces=None):
            return base * 99.0
    # run with new intervention type
    pv_gpt2 = pv.IntervenableModel({
      "intervention_type": MultiplierIntervention},
      model=gpt2)
    intervened_outputs = pv_gpt2(
      base = tokenizer("The capital of Spain is",
        return_tensors="pt"),
      unit_locations={"base": 3})

    base = tokenizer("The capital of Spain is", return_tensors="pt")

    def times99(x, _):
        x = x.clone()
        x[:, 3] *= 99.0
        return x

    close(intervened_outputs[1].last_hidden_state, hidden(gpt2, base, [(RESID.format(0), times99)]))
    differs(intervened_outputs[1].last_hidden_state, hidden(gpt2, base))


# -- Saving and Loading ----------------------------------------------------------------------------------------------


def test_saving_and_loading(gpt2_dir, tmp_path):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    # run with new intervention type
    pv_gpt2 = pv.IntervenableModel({
      "intervention_type": pv.ZeroIntervention},
      model=gpt2)

    pv_gpt2.save(str(tmp_path))

    # next cell
    pv_gpt2_loaded = pv.IntervenableModel.load(
        str(tmp_path),
        model=gpt2)

    base = tokenizer("The capital of Spain is", return_tensors="pt")
    _, a = pv_gpt2(base, unit_locations={"base": 3})
    _, b = pv_gpt2_loaded(base, unit_locations={"base": 3})
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert pv_gpt2_loaded.sorted_keys == pv_gpt2.sorted_keys
    close(a.last_hidden_state, hidden(gpt2, base, [(RESID.format(0), put(3, 0.0))]))


# -- Multi-Source Interchange Intervention (Parallel / Serial) --------------------------------------------------------


def test_multi_source_parallel_then_serial(gpt2_dir, capsys):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    parallel_config = pv.IntervenableConfig([
      {"layer": 3, "component": "block_output"},
      {"layer": 3, "component": "block_output"}],
      # intervene on base at the same time
      mode="parallel")
    parallel_gpt2 = pv.IntervenableModel(
      parallel_config, model=gpt2)
    base = tokenizer(
      "The capital of Spain is",
      return_tensors="pt")
    sources = [
      tokenizer("The language of Spain is",
        return_tensors="pt"),
      tokenizer("The capital of Italy is",
        return_tensors="pt")]
    intervened_outputs = parallel_gpt2(
        base, sources,
        {"sources->base": (
        # each list has a dimensionality of
        # [num_intervention, batch, num_unit]
        [[[1]],[[3]]],  [[[1]],[[3]]])}
    )

    distrib = pv.embed_to_distrib(
        gpt2, intervened_outputs[1].last_hidden_state, logits=False)
    pv.top_vals(tokenizer, distrib[0][-1], n=10)

    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 10
    probs = [float(line.split()[-1]) for line in lines]
    assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
    s0, s1 = (acts(gpt2, s)[RESID.format(3)] for s in sources)

    def both(x, _):
        x = x.clone()
        x[:, 1] = s0[:, 1]
        x[:, 3] = s1[:, 3]
        return x

    close(intervened_outputs[1].last_hidden_state, hidden(gpt2, base, [(RESID.format(3), both)]))
    close(distrib[0][-1], torch.softmax(intervened_outputs[1].last_hidden_state[0, -1] @ gpt2.wte.weight.T, -1))

    # -- Serial Mode (the seed cell reuses gpt2, tokenizer from the cell above)
    config = pv.IntervenableConfig([
      {"layer": 3, "component": "block_output"},
      {"layer": 10, "component": "block_output"}],
      # intervene on base one after another
      mode="serial")
    pv_gpt2 = pv.IntervenableModel(
      config, model=gpt2)
    base = tokenizer(
      "The capital of Spain is",
      return_tensors="pt")
    sources = [
      tokenizer("The language of Spain is",
        return_tensors="pt"),
      tokenizer("The capital of Italy is",
        return_tensors="pt")]

    intervened_outputs = pv_gpt2(
        base, sources,
        # intervene in serial at two positions
        {"source_0->source_1": 1,
         "source_1->base"    : 4})

    distrib = pv.embed_to_distrib(
        gpt2, intervened_outputs[1].last_hidden_state, logits=False)
    pv.top_vals(tokenizer, distrib[0][-1], n=10)

    assert len(capsys.readouterr().out.strip().splitlines()) == 10
    a = acts(gpt2, sources[0])[RESID.format(3)][:, 1]
    b = acts(gpt2, sources[1], [(RESID.format(3), put(1, a))])[RESID.format(10)][:, 4]
    close(intervened_outputs[1].last_hidden_state, hidden(gpt2, base, [(RESID.format(10), put(4, b))]))
    # the chain matters: source_1 was itself intervened on
    differs(b, acts(gpt2, sources[1])[RESID.format(10)][:, 4])


def test_multi_source_with_subspaces_parallel(gpt2_dir):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    config = pv.IntervenableConfig([
        {"layer": 0, "component": "block_output",
         "subspace_partition":
             [[0, 128], [128, 256]]}]*2,
        intervention_types=pv.VanillaIntervention,
        # act in parallel
        mode="parallel"
    )
    pv_gpt2 = pv.IntervenableModel(config, model=gpt2)

    base = tokenizer("The capital of Spain is", return_tensors="pt")
    sources = [tokenizer("The capital of Italy is", return_tensors="pt"),
              tokenizer("The capital of China is", return_tensors="pt")]

    intervened_outputs = pv_gpt2(
        base, sources,
        # on same position
        {"sources->base": 4},
        # on different subspaces
        subspaces=[[[0]], [[1]]],
    )

    s0, s1 = (acts(gpt2, s)[RESID.format(0)] for s in sources)

    def oracle(x, _):
        x = x.clone()
        x[:, 4, :128] = s0[:, 4, :128]
        x[:, 4, 128:] = s1[:, 4, 128:]
        return x

    close(intervened_outputs[1].last_hidden_state, hidden(gpt2, base, [(RESID.format(0), oracle)]))


def test_multi_source_with_subspaces_serial(gpt2_dir):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    config = pv.IntervenableConfig([
        {"layer": 0, "component": "block_output",
         "subspace_partition": [[0, 128], [128, 256]]},
        {"layer": 2, "component": "block_output",
         "subspace_partition": [[0, 128], [128, 256]]}],
        intervention_types=pv.VanillaIntervention,
        # act in parallel
        mode="serial"
    )
    pv_gpt2 = pv.IntervenableModel(config, model=gpt2)

    base = tokenizer("The capital of Spain is", return_tensors="pt")
    sources = [tokenizer("The capital of Italy is", return_tensors="pt"),
              tokenizer("The capital of China is", return_tensors="pt")]

    intervened_outputs = pv_gpt2(
        base, sources,
        # serialized intervention
        # order is based on sources list
        {"source_0->source_1": 3, "source_1->base": 4},
        # on different subspaces
        subspaces=[[[0]], [[1]]],
    )

    a = acts(gpt2, sources[0])[RESID.format(0)][:, 3, :128]
    b = acts(gpt2, sources[1], [(RESID.format(0), put(3, a, slice(0, 128)))])[RESID.format(2)][:, 4, 128:]
    expect = hidden(gpt2, base, [(RESID.format(2), put(4, b, slice(128, 256)))])
    close(intervened_outputs[1].last_hidden_state, expect)
    differs(b, acts(gpt2, sources[1])[RESID.format(2)][:, 4, 128:])


# -- Interchange Intervention Training (IIT) -----------------------------------------------------------------------


def test_interchange_intervention_training(gpt2_dir):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    pv_gpt2 = pv.IntervenableModel({
        "layer": 8},
        model=gpt2
    )

    pv_gpt2.enable_model_gradients()
    # run counterfactual forward as usual

    assert {id(p) for p in pv_gpt2.get_trainable_parameters()} == {id(p) for p in gpt2.parameters()}
    _, out = pv_gpt2(tokenizer("The capital of Spain is", return_tensors="pt"),
                     [tokenizer("The capital of Italy is", return_tensors="pt")], {"sources->base": 3})
    # One coordinate, not `.sum()`: the last hidden state is ln_final's output, whose weight is 1 and bias 0 here,
    # so each position's coordinates sum to 0 whatever the input and the gradient of the sum is identically 0
    # (the sum of squares is no better: it is d * var / (var + eps), almost constant).
    out.last_hidden_state[:, -1, 0].sum().backward()
    assert gpt2.blocks[11].mlp.fc.weight.grad.abs().sum() > 0
    assert gpt2.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # reached through the source run too


# -- pyvene 102: Grouping -----------------------------------------------------------------------------------------


def test_grouping(gpt2_dir):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    config = pv.IntervenableConfig([
        {"layer": 0, "component": "block_output", "group_key": 0},
        {"layer": 2, "component": "block_output", "group_key": 0}],
        intervention_types=pv.VanillaIntervention,
    )

    pv_gpt2 = pv.IntervenableModel(config, model=gpt2)

    base = tokenizer("The capital of Spain is", return_tensors="pt")
    sources = [tokenizer("The capital of Italy is", return_tensors="pt")]
    intervened_outputs = pv_gpt2(
        base, sources,
        {"sources->base": ([
            [[3]], [[4]] # these two are for two interventions
        ], [             # source position 3 into base position 4
            [[3]], [[4]]
        ])}
    )

    c = acts(gpt2, sources[0])
    expect = hidden(gpt2, base, [(RESID.format(0), put(3, c[RESID.format(0)][:, 3])),
                                 (RESID.format(2), put(4, c[RESID.format(2)][:, 4]))])
    close(intervened_outputs[1].last_hidden_state, expect)


# -- Intervention Skipping in Runtime -----------------------------------------------------------------------------


def test_intervention_skipping(gpt2_dir, capsys):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    config = pv.IntervenableConfig([
        # these are equivalent interventions
        # we create them on purpose
        {"layer": 0, "component": "block_output"},
        {"layer": 0, "component": "block_output"},
        {"layer": 0, "component": "block_output"}],
        intervention_types=pv.VanillaIntervention,
    )
    pv_gpt2 = pv.IntervenableModel(config, model=gpt2)

    base = tokenizer("The capital of Spain is", return_tensors="pt")
    source = tokenizer("The capital of Italy is", return_tensors="pt")
    # skipping 1, 2 and 3
    _, pv_out1 = pv_gpt2(base, [None, None, source],
        {"sources->base": ([None, None, [[4]]], [None, None, [[4]]])})
    _, pv_out2 = pv_gpt2(base, [None, source, None],
        {"sources->base": ([None, [[4]], None], [None, [[4]], None])})
    _, pv_out3 = pv_gpt2(base, [source, None, None],
        {"sources->base": ([[[4]], None, None], [[[4]], None, None])})
    # should have the same results
    print(
        torch.equal(pv_out1.last_hidden_state, pv_out2.last_hidden_state),
        torch.equal(pv_out2.last_hidden_state, pv_out3.last_hidden_state)
    )

    assert capsys.readouterr().out.split() == ["True", "True"]
    s = acts(gpt2, source)[RESID.format(0)][:, 4]
    close(pv_out1.last_hidden_state, hidden(gpt2, base, [(RESID.format(0), put(4, s))]))
    differs(pv_out1.last_hidden_state, hidden(gpt2, base))


# -- Subspace Partition ------------------------------------------------------------------------------------------------


def test_subspace_partition(gpt2_dir):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    config = pv.IntervenableConfig([
        # they are linked to manipulate the same representation
        # but in different subspaces
        {"layer": 0, "component": "block_output",
         # subspaces can be partitioned into continuous chunks
         # [i, j] are the boundary indices
         "subspace_partition": [[0, 128], [128, 256]]}],
        intervention_types=pv.VanillaIntervention,
    )
    pv_gpt2 = pv.IntervenableModel(config, model=gpt2)

    base = tokenizer("The capital of Spain is", return_tensors="pt")
    source = tokenizer("The capital of Italy is", return_tensors="pt")

    # using intervention skipping for subspace
    intervened_outputs = pv_gpt2(
        base, [source],
        {"sources->base": 4},
        # intervene only only dimensions from 128 to 256
        subspaces=1,
    )

    s = acts(gpt2, source)[RESID.format(0)][:, 4, 128:]
    expect = hidden(gpt2, base, [(RESID.format(0), put(4, s, slice(128, 256)))])
    close(intervened_outputs[1].last_hidden_state, expect)
    differs(intervened_outputs[1].last_hidden_state, hidden(gpt2, base))


# -- Intervention Linking ----------------------------------------------------------------------------------------------


def test_intervention_linking(gpt2_dir, capsys):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    config = pv.IntervenableConfig([
        # they are linked to manipulate the same representation
        # but in different subspaces
        {"layer": 0, "component": "block_output",
         "subspace_partition": [[0, 128], [128, 256]], "intervention_link_key": 0},
        {"layer": 0, "component": "block_output",
         "subspace_partition": [[0, 128], [128, 256]], "intervention_link_key": 0}],
        intervention_types=pv.VanillaIntervention,
    )
    pv_gpt2 = pv.IntervenableModel(config, model=gpt2)

    base = tokenizer("The capital of Spain is", return_tensors="pt")
    source = tokenizer("The capital of Italy is", return_tensors="pt")

    # using intervention skipping for subspace
    _, pv_out1 = pv_gpt2(
        base, [None, source],
        # 4 means token position 4
        {"sources->base": ([None, [[4]]], [None, [[4]]])},
        # 1 means the second partition in the config
        subspaces=[None, [[1]]],
    )
    _, pv_out2 = pv_gpt2(
        base,
        [source, None],
        {"sources->base": ([[[4]], None], [[[4]], None])},
        subspaces=[[[1]], None],
    )
    print(torch.equal(pv_out1.last_hidden_state, pv_out2.last_hidden_state))

    # subspaces provide a list of index and they can be in any order
    _, pv_out3 = pv_gpt2(
        base,
        [source, source],
        {"sources->base": ([[[4]], [[4]]], [[[4]], [[4]]])},
        subspaces=[[[0]], [[1]]],
    )
    _, pv_out4 = pv_gpt2(
        base,
        [source, source],
        {"sources->base": ([[[4]], [[4]]], [[[4]], [[4]]])},
        subspaces=[[[1]], [[0]]],
    )
    print(torch.equal(pv_out3.last_hidden_state, pv_out4.last_hidden_state))

    assert capsys.readouterr().out.split() == ["True", "True"]
    k0, k1 = pv_gpt2.sorted_keys
    assert pv_gpt2.interventions[k0][0] is pv_gpt2.interventions[k1][0]
    s = acts(gpt2, source)[RESID.format(0)][:, 4]
    close(pv_out1.last_hidden_state, hidden(gpt2, base, [(RESID.format(0), put(4, s[:, 128:], slice(128, 256)))]))
    # both partitions swapped == the whole vector swapped
    close(pv_out3.last_hidden_state, hidden(gpt2, base, [(RESID.format(0), put(4, s))]))


# -- Composing Complex Intervention Schema: Path Patching --------------------------------------------------------------


def path_patching_config(
    layer, last_layer,
    component="head_attention_value_output", unit="h.pos"
):
    intervening_component = [
        {"layer": layer, "component": component, "unit": unit, "group_key": 0}]
    restoring_components = []
    if not component.startswith("mlp_"):
        restoring_components += [
            {"layer": layer, "component": "mlp_output", "group_key": 1}]
    for i in range(layer+1, last_layer):
        restoring_components += [
            {"layer": i, "component": "attention_output", "group_key": 1},
            {"layer": i, "component": "mlp_output", "group_key": 1}
        ]
    intervenable_config = pv.IntervenableConfig(
        intervening_component + restoring_components)
    return intervenable_config


def test_path_patching(gpt2_dir, tmp_path):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    pv_gpt2 = pv.IntervenableModel(
        path_patching_config(4, gpt2.config.n_layer),
        model=gpt2
    )

    pv_gpt2.save(
        save_directory=str(tmp_path)
    )

    # next cell
    pv_gpt2_loaded = pv.IntervenableModel.load(
        str(tmp_path),
        model=gpt2)

    n = 1 + 1 + 2 * (12 - 5)
    assert len(pv_gpt2.sorted_keys) == n and pv_gpt2_loaded.sorted_keys == pv_gpt2.sorted_keys
    # a path-patching call: head 3 at position 4 from the corrupted source, every later attention/MLP output
    # restored from the clean run (group 1's source is the base itself)
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    source = tokenizer("The capital of Italy is", return_tensors="pt")
    all_pos = [[0, 1, 2, 3, 4]]
    locs = [[[[3]], [[4]]]] + [all_pos] * (n - 1)
    _, out = pv_gpt2(base, [source, base], {"sources->base": (locs, locs)})
    _, out2 = pv_gpt2_loaded(base, [source, base], {"sources->base": (locs, locs)})
    assert torch.equal(out.last_hidden_state, out2.last_hidden_state)

    z = acts(gpt2, source)["blocks.4.attn.hook_z"]
    clean = acts(gpt2, base)

    def head(x, _):
        x = x.clone()
        x[:, 4, 3] = z[:, 4, 3]
        return x

    hooks = [("blocks.4.attn.hook_z", head), (MLP_OUT.format(4), lambda x, _: clean[MLP_OUT.format(4)].clone())]
    for i in range(5, 12):
        hooks += [(f"blocks.{i}.hook_attn_out", lambda x, _, i=i: clean[f"blocks.{i}.hook_attn_out"].clone()),
                  (MLP_OUT.format(i), lambda x, _, i=i: clean[MLP_OUT.format(i)].clone())]
    close(out.last_hidden_state, hidden(gpt2, base, hooks))
    differs(out.last_hidden_state, hidden(gpt2, base))


# -- Composing Complex Intervention Schema: Causal Tracing in 15 lines -------------------------------------------------


def causal_tracing_config(
  l, c="mlp_activation", w=10, tl=48):
  s = max(0, l - w // 2)
  e = min(tl, l - (-w // 2))
  config = pv.IntervenableConfig(
    [{"component": "block_input"}] +
    [{"layer": l, "component": c}
      for l in range(s, e)],
    [pv.NoiseIntervention] +
    [pv.VanillaIntervention]*(e-s))
  return config


def test_causal_tracing(gpt2_dir):
    _, tokenizer, gpt2 = pv.create_gpt2(gpt2_dir)

    pv_gpt2 = pv.IntervenableModel(
        causal_tracing_config(4),
        model=gpt2
    )

    keys = pv_gpt2.sorted_keys
    assert len(keys) == 10
    assert type(pv_gpt2.interventions[keys[0]][0]) is pv.NoiseIntervention
    assert [pv_gpt2.interventions[k][1] for k in keys] == (
        ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.mlp.hook_post" for i in range(9)])
    # a tracing call as in pyvene's Causal_Tracing tutorial: corrupt the subject tokens 0-2 of the embedding,
    # restore the clean MLP activations at position 3 of layers 0-8
    base = tokenizer("The Space Needle is in downtown", return_tensors="pt")
    _, out = pv_gpt2(base, [None] + [base] * 9,
                     {"sources->base": ([None] + [[[3]]] * 9, [[[0, 1, 2]]] + [[[3]]] * 9)})
    noise = torch.randn((1, 3, 256), generator=torch.Generator().manual_seed(0)) * 0.13462981581687927
    clean = acts(gpt2, base)

    def corrupt(x, _):
        x = x.clone()
        x[:, :3] += noise
        return x

    hooks = [("blocks.0.hook_resid_pre", corrupt)]
    hooks += [(f"blocks.{i}.mlp.hook_post", put(3, clean[f"blocks.{i}.mlp.hook_post"][:, 3])) for i in range(9)]
    close(out.last_hidden_state, hidden(gpt2, base, hooks))
    differs(out.last_hidden_state, hidden(gpt2, base))
