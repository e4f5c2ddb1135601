import json
import zipfile

import pytest

from stages.common.errors import PipelineError
from stages.package_zip import write_zip
from tests.conftest import REPO, load_yaml


def adapter_folder(tmp_path):
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "sub" / "tokenizer.json").write_text("{}")
    (folder / "params.json").write_text(json.dumps(load_yaml(REPO / "params.yaml")))
    return folder


def test_zip_holds_only_files_inside_the_folder(tmp_path):
    folder = adapter_folder(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not ship")
    (folder / "link.txt").symlink_to(secret)
    (folder / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    write_zip(folder, tmp_path / "out.zip")
    names = zipfile.ZipFile(tmp_path / "out.zip").namelist()
    assert sorted(names) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "params.json",
        "sub/tokenizer.json",
    ]
    assert all(not n.startswith("/") and ".." not in n.split("/") for n in names)


def test_zip_bytes_are_reproducible_and_card_describes_the_run(tmp_path):
    folder = adapter_folder(tmp_path)
    write_zip(folder, tmp_path / "a.zip")
    write_zip(folder, tmp_path / "b.zip")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    card = zipfile.ZipFile(tmp_path / "a.zip").read("README.md").decode()
    assert "r=4" in card and "SmolLM2" in card


def test_folder_without_adapter_is_an_error_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="adapter_config.json missing"):
        write_zip(tmp_path / "empty", tmp_path / "out.zip")
    assert list(tmp_path.iterdir()) == [tmp_path / "empty"]
