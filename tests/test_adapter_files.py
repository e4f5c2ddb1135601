"""What the adapter folder (and every checkpoint) says about its base must not depend on where things are
installed: peft writes the base model's resolved path into its card and a set of target modules in JSON."""

import copy
import json

from stages.common.params import parse_params
from tests.conftest import REPO, load_yaml


def test_saved_adapter_names_the_base_by_its_param_and_sorts_its_modules(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from stages.finetuning.model import attach_lora

    raw = copy.deepcopy(load_yaml(REPO / "params.yaml"))
    raw["model"]["name"] = "models/base/tiny"
    raw["lora"]["target_modules"] = ["v_proj", "q_proj", "o_proj", "k_proj"]
    params = parse_params(raw)
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), params)
    model.save_pretrained(tmp_path / "saved")  # as the Trainer saves a checkpoint: peft's own card included
    for file in (tmp_path / "saved").iterdir():
        assert str(tiny_model_dir).encode() not in file.read_bytes(), file.name
    config = json.loads((tmp_path / "saved/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "models/base/tiny"
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert "base_model: models/base/tiny" in (tmp_path / "saved/README.md").read_text()
