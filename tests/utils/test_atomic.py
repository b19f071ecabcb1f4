import json
import os

import pytest

from morphoquant.utils import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert os.listdir(p.parent) == ["f.txt"]
    atomic_write_json(tmp_path / "x.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2]}
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "nan.json", {"a": float("nan")})
    assert not (tmp_path / "nan.json").exists()


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(p, "new")
    monkeypatch.undo()
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_atomic_directory_commit_and_rollback(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as d:
        (d / "data.bin").write_bytes(b"x")
        assert not target.exists()                     # invisible until complete
        (d / "manifest.json").write_text("{}")
    assert sorted(os.listdir(target)) == ["data.bin", "manifest.json"]

    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "bad") as d:
        (d / "data.bin").write_bytes(b"x")
        raise RuntimeError("crash before the manifest")
    assert not (tmp_path / "bad").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]     # no temporary directories left behind


def test_atomic_directory_overwrite(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as d:
        (d / "v").write_text("1")
    with pytest.raises(FileExistsError), atomic_directory(target) as d:
        pass
    with pytest.raises(RuntimeError), atomic_directory(target, overwrite=True) as d:
        (d / "v").write_text("2")
        raise RuntimeError
    assert (target / "v").read_text() == "1"           # a failed overwrite keeps the old directory
    with atomic_directory(target, overwrite=True) as d:
        (d / "v").write_text("3")
    assert (target / "v").read_text() == "3" and os.listdir(tmp_path) == ["out"]
