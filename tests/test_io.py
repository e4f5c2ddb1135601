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
