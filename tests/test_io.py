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


def test_a_killed_runs_temporary_files_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "adapter.zip"
    (tmp_path / ".adapter.zip.abc123_x.tmp").write_bytes(b"half a zip")  # what a SIGKILL mid-write leaves
    (tmp_path / ".adapter.zip.kq1z_8pm.tmp").mkdir()
    (tmp_path / ".other.zip.abc123_x.tmp").write_text("not ours")
    (tmp_path / ".adapter.abc123_x.tmp").write_text("the adapter folder's, not the zip's")
    write_json(target, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".adapter.abc123_x.tmp",
        ".other.zip.abc123_x.tmp",
        "adapter.zip",
    ]


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
