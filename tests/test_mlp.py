"""pyvene's MLP classifier as a hooked model: the function it computes, its hooks, pyvene's names, interventions."""

import pytest
import torch
import torch.nn.functional as F

import hookvene as pv
from tests.helpers import close, differs


@pytest.fixture()
def clf():
    torch.manual_seed(0)
    return pv.create_mlp_classifier(pv.MLPConfig(h_dim=3, n_layer=2, pdrop=0.0, num_classes=5, include_bias=True,
                                                 squeeze_output=False))[2]


def test_forward_is_the_stack_then_the_score(clf):
    x = torch.randn(4, 1, 3)
    h = x
    for block in clf.mlp.h:  # pyvene's names: clf.mlp.h[i].ff1 / act, clf.score
        h = block.act(block.ff1(h))
    close(clf(inputs_embeds=x).logits, clf.score(h))
    assert clf(inputs_embeds=x)[0].shape == (4, 1, 5)  # logits first, as transformers' classifiers
    squeezed = pv.MLPClassifier(pv.MLPConfig(h_dim=3, n_layer=1, num_classes=2))
    assert squeezed(inputs_embeds=x).logits.shape == (4, 2)
    with pytest.raises(ValueError, match="squeeze_output=True needs one position"):
        squeezed(inputs_embeds=torch.randn(4, 2, 3))


def test_loss_and_config_names(clf):
    x, y = torch.randn(4, 1, 3), torch.tensor([0, 1, 2, 3])
    out = clf(inputs_embeds=x, labels=y)
    close(out.loss, F.cross_entropy(out.logits.reshape(-1, 5), y))
    cfg = clf.config
    assert (cfg.h_dim, cfg.n_layer, cfg.num_classes, cfg.num_labels) == (3, 2, 5, 5)
    assert cfg.to_dict()["h_dim"] == 3
    with pytest.raises(ValueError, match="unknown MLPConfig argument"):
        pv.MLPConfig(hdim=3)
    with pytest.raises(ValueError, match="has no embeddings"):
        clf(input_ids=torch.zeros(1, 1, dtype=torch.long))


def test_every_hook_fires(clf):
    _, cache = clf.run_with_cache(inputs_embeds=torch.randn(2, 1, 3))
    assert set(cache) == set(clf.hook_dict)


def test_mlp_activation_interchange_matches_a_hand_patch(clf):
    """Vanilla at mlp_activation of block 0, dims 1..2 via a subspace partition: as patching by hand."""
    base, src = {"inputs_embeds": torch.randn(6, 1, 3)}, {"inputs_embeds": torch.randn(6, 1, 3)}
    pvm = pv.IntervenableModel({"layer": 0, "component": "mlp_activation", "subspace_partition": [[1, 3], [0, 1]]},
                               clf)
    _, out = pvm(base, [src], {"sources->base": 0}, subspaces=0)

    def act0(x):
        return clf.mlp.h[0].act(clf.mlp.h[0].ff1(x))
    patched = act0(base["inputs_embeds"]).clone()
    patched[..., 1:3] = act0(src["inputs_embeds"])[..., 1:3]
    want = clf.score(clf.mlp.h[1].act(clf.mlp.h[1].ff1(patched)))
    close(out.logits, want)
    differs(out.logits, clf(**base).logits)
    assert pv.IntervenableModel({"component": "h[0].act.output", "intervention": lambda b, s: b * 0}, clf)
