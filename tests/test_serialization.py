"""IntervenableModel.save / load: round trip and clear errors for directories it did not write."""

import json

import pytest
import torch

import hookvene as pv
from tests.helpers import tiny_gpt2


@pytest.fixture(scope="module")
def model():
    return pv.from_pretrained(tiny_gpt2(None, n_layer=2))


def test_round_trip_trainable_and_constant(model, tmp_path):
    config = pv.IntervenableConfig([
        {"layer": 0, "component": "block_output", "low_rank_dimension": 2,
         "intervention_type": pv.LowRankRotatedSpaceIntervention},
        {"layer": 1, "component": "mlp_output", "source_representation": torch.randn(32),
         "intervention_type": pv.AdditionIntervention}])
    iv = pv.IntervenableModel(config, model)
    base, source = torch.randint(0, 101, (2, 6)), torch.randint(0, 101, (2, 6))
    _, before = iv({"input_ids": base}, [{"input_ids": source}, None], {"sources->base": 3})
    iv.save(str(tmp_path))
    loaded = pv.IntervenableModel.load(str(tmp_path), model)
    _, after = loaded({"input_ids": base}, [{"input_ids": source}, None], {"sources->base": 3})
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["representations"][0]["intervention_type"].endswith(":LowRankRotatedSpaceIntervention")


def test_load_refuses_a_directory_it_did_not_write(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="interventions.safetensors"):
        pv.IntervenableModel.load(str(tmp_path), model)


def test_load_reports_a_corrupt_weights_file(model, tmp_path):
    pv.IntervenableModel({"layer": 0, "intervention_type": pv.ZeroIntervention}, model).save(str(tmp_path))
    (tmp_path / "interventions.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read the saved intervention"):
        pv.IntervenableModel.load(str(tmp_path), model)


def test_load_reports_a_class_that_cannot_be_imported(model, tmp_path):
    pv.IntervenableModel({"layer": 0, "intervention_type": pv.ZeroIntervention}, model).save(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["representations"][0]["intervention_type"] = "nowhere.module:Missing"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown intervention type .nowhere.module:Missing.: loading never imports"):
        pv.IntervenableModel.load(str(tmp_path), model)
