"""Sharing through a DVC remote: push with the run-cache, then a fresh clone gets every out without retraining,
from a local-directory remote and from a real WebDAV server on loopback; `dvc get` fetches one zip."""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.dvc_project import BIN, TINY_MODEL, commit, copy_project, env, run, stages_run

pytestmark = pytest.mark.slow
OUTS = ["models/adapter/adapter_model.safetensors", "models/adapter.zip", "data/tokenized/meta.json"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained_project):
    return copy_project(trained_project[0], tmp_path_factory.mktemp("shared") / "project")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webdav(tmp_path_factory):
    """A real WebDAV server (wsgidav) on loopback, stopped after the tests."""
    root = tmp_path_factory.mktemp("webdav-root")
    (root / "store").mkdir()
    port = free_port()
    server = subprocess.Popen(
        [
            str(BIN / "wsgidav"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--root",
            str(root),
            "--auth",
            "anonymous",
            "--no-config",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "wsgidav did not start"
            time.sleep(0.2)
    yield f"webdav://127.0.0.1:{port}/store", root / "store"
    server.terminate()
    server.wait(timeout=10)


def teammate_has_the_base_model(project: Path, clone: Path) -> None:
    """A local base model is not in git (nor in the DVC remote): a teammate gets the same one (as with a hub id)."""
    shutil.copytree(project / TINY_MODEL, clone / TINY_MODEL)


def clone_and_pull(project: Path, target: Path, remote: str) -> None:
    """A teammate's clone: `dvc pull` restores every out, status is clean; `dvc repro --pull` in another fresh
    clone reruns nothing."""
    run(project.parent, "git", "clone", "-q", str(project), str(target))
    teammate_has_the_base_model(project, target)
    assert not (target / "models/adapter").exists()
    run(target, "dvc", "pull", "-r", remote)
    for out in OUTS:
        assert (target / out).read_bytes() == (project / out).read_bytes(), out
    assert "up to date" in run(target, "dvc", "status").stdout.lower()

    other = target.with_name(target.name + "-repro")
    run(project.parent, "git", "clone", "-q", str(project), str(other))
    teammate_has_the_base_model(project, other)
    run(other, "dvc", "remote", "default", "--local", remote)
    assert stages_run(run(other, "dvc", "repro", "--pull", "--allow-missing")) == set()


def test_local_remote_round_trip(project, tmp_path):
    run(project, "dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"))
    commit(project, "local remote")
    run(project, "dvc", "push", "--run-cache")
    clone_and_pull(project, tmp_path / "clone", "local")


def test_webdav_remote_round_trip(project, webdav, tmp_path):
    url, folder = webdav
    run(project, "dvc", "remote", "add", "web", url)
    commit(project, "webdav remote")
    run(project, "dvc", "push", "--run-cache", "-r", "web")
    assert any(p.is_file() for p in folder.rglob("*"))
    clone_and_pull(project, tmp_path / "clone", "web")


def test_dvc_get_fetches_one_adapter_without_cloning(project, tmp_path):
    run(tmp_path, "dvc", "get", str(project), "models/adapter.zip", "-o", str(tmp_path / "adapter.zip"))
    assert (tmp_path / "adapter.zip").read_bytes() == (project / "models/adapter.zip").read_bytes()


def test_base_model_stays_out_of_the_cache(project, tiny_model_dir):
    weights = hashlib.md5((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    cached = {p.parent.name + p.name for p in (project / ".dvc/cache").rglob("*") if p.is_file()}
    assert cached and weights not in cached


def test_remote_that_does_not_answer_is_one_error_and_loses_nothing(project):
    run(project, "dvc", "remote", "add", "dead", f"webdav://127.0.0.1:{free_port()}/store")
    before = (project / "models/adapter.zip").read_bytes()
    result = subprocess.run(
        [str(BIN / "dvc"), "push", "-r", "dead"], cwd=project, env=env(), capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "ERROR" in result.stderr and "connect" in result.stderr.lower()
    assert (project / "models/adapter.zip").read_bytes() == before
