import pytest

from stages.common.io import atomic_path, write_json


def test_failed_write_leaves_neither_output_nor_temporary(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_path(target, directory=True) as tmp:
        (tmp / "half.json").write_text("{")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_rewrite_keeps_the_previous_output(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"ok": 1})
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise KeyboardInterrupt
    assert target.read_text() == '{\n  "ok": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_folder_output_is_replaced_whole(tmp_path):
    target = tmp_path / "adapter"
    for name in ("old", "new"):
        with atomic_path(target, directory=True) as tmp:
            (tmp / f"{name}.txt").write_text(name)
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def _ended_pid() -> int:
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_killed_runs_temporary_files_are_removed_by_the_next_write(tmp_path):
    import os

    target, dead, alive = tmp_path / "adapter.zip", _ended_pid(), os.getpid()
    (tmp_path / f".adapter.zip.{dead}-abc123_x.tmp").write_bytes(b"half a zip")  # what a SIGKILL mid-write leaves
    (tmp_path / f".adapter.zip.{dead}-kq1z_8pm.tmp").mkdir()
    (tmp_path / f".adapter.zip.{alive}-kq1z_8pm.tmp").mkdir()  # a writer still running: not touched
    (tmp_path / f".other.zip.{dead}-abc123_x.tmp").write_text("not ours")
    (tmp_path / f".adapter.{dead}-abc123_x.tmp").write_text("the adapter folder's, not the zip's")
    write_json(target, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            f".adapter.zip.{alive}-kq1z_8pm.tmp",
            f".adapter.{dead}-abc123_x.tmp",
            f".other.zip.{dead}-abc123_x.tmp",
            "adapter.zip",
        ]
    )


def test_any_stage_clears_what_a_killed_stage_left_and_git_ignores_it_meanwhile(tmp_path):
    """A stage killed under `dvc repro` may never run again (DVC restores its outputs from the run cache), so every
    stage removes any out's temporary whose writer is gone, before it reads its params."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    dead = _ended_pid()
    leftovers = [
        tmp_path / f"models/.adapter.{dead}-abc123_x.tmp",
        tmp_path / f"dvclive/plots/.metrics.{dead}-abc123_x.tmp",
    ]
    for leftover in leftovers:
        leftover.mkdir(parents=True)
        (leftover / "adapter_model.safetensors").write_bytes(b"half")
    kept = tmp_path / f"models/.adapter.zip.{os.getpid()}-abc123_x.tmp"
    kept.write_text("a live writer's")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", f"models/.adapter.{dead}-abc123_x.tmp"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0  # git status stays clean while one is there
    done = subprocess.run(
        [sys.executable, "-m", "stages.plot"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 2 and "params.yaml" in done.stderr  # no params here: the stage stops right after
    assert not any(leftover.exists() for leftover in leftovers) and kept.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_follow_the_umask(tmp_path, umask):
    import os

    previous = os.umask(umask)
    try:
        write_json(tmp_path / "file.json", {})
        with atomic_path(tmp_path / "folder", directory=True) as tmp:
            (tmp / "inner").mkdir()
            write_json(tmp / "inner" / "x.json", {})
    finally:
        os.umask(previous)
    assert (tmp_path / "file.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "folder/inner/x.json").stat().st_mode & 0o777 == 0o666 & ~umask
