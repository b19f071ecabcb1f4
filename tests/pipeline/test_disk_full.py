"""A full (or read-only) output disk during ``morphoquant quantize --out`` / ``save_quantized``.

Expected everywhere: a one-line error naming the problem and the fix, exit code 2 from the CLI, and nothing that
looks complete — no ``run.json`` (the run directory's manifest), no ``checkpoint/`` (whose manifest is
``morphoquant.json``), no temporary files; and after space is freed the same command resumes and finishes.

The libraries underneath report a full disk in three ways (measured on a real 64 KiB tmpfs): ``OSError(28)`` from
Python file writes, ``SafetensorError("... No space left on device (os error 28)")`` from safetensors, and
``RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")`` — errno lost — from
``torch.save``. The simulations below raise exactly those, at each place the CLI writes; the last test uses a
real tmpfs when the test may mount one (root), and is skipped otherwise.
"""
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from morphoquant.cli import main as cli
from morphoquant.eval import tasks
from morphoquant.export import save_quantized
from morphoquant.models.tiny import tiny_model
from morphoquant.pipeline import runner as runner_module
from morphoquant.pipeline.recipe import load_recipe
from morphoquant.utils import atomic
from morphoquant.utils.atomic import OutputWriteError, atomic_directory, atomic_write_bytes, write_error

ENOSPC_TORCH = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
ENOSPC_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"


class _FakeTask:
    """The built-in text task's interface, with tiny-model samples (no tokenizer, no data files)."""

    metric, kind, lower_is_better = "wiki_ppl", "text-lm", True

    def __init__(self, factory):
        self.factory = factory

    def calibration_samples(self, n, seq_len, seed=0):
        return [self.factory(seed=i) for i in range(n)]

    def describe(self):
        return {"task": self.kind}


@pytest.fixture
def tiny_cli(monkeypatch, request):
    model, factory = tiny_model("llama")
    monkeypatch.setattr(cli, "_load", lambda ref: (model, None))
    monkeypatch.setattr(tasks, "task_for", lambda m, p, **kw: _FakeTask(factory))
    if "report" not in request.node.name:      # the HTML report (matplotlib) takes seconds: only where tested
        monkeypatch.setattr(cli, "_write_report", lambda run_dir: None)

    def run(out: Path) -> int:
        return cli.main(["--quiet", "quantize", "tiny", "-r", "rtn-w4a4", "--set", "weights.group_size=16",
                         "--calib", "2", "--no-eval", "--out", str(out)])
    return run


def _disk_full_statvfs(real):
    def fake(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, st.f_files, st.f_ffree,
                                  st.f_favail, st.f_flag, st.f_namemax))
    return fake


def _assert_nothing_looks_complete(out: Path) -> None:
    run = out / "rtn-w4a4"
    assert not (run / "run.json").exists()
    assert not (run / "checkpoint").exists()
    assert not list(out.rglob("morphoquant.json"))
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], "temporary files left behind"
    # what may remain: the layer log and the resume checkpoint (and nothing else)
    assert {p.name for p in run.iterdir()} <= {"layers.jsonl", ".resume"}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- write_error: recognising a full disk
def test_write_error_recognises_the_three_ways_a_full_disk_is_reported(tmp_path, monkeypatch):
    e = write_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "a.json")
    assert isinstance(e, OutputWriteError) and e.errno == errno.ENOSPC
    assert "no space left" in str(e) and "a.json" in str(e) and "free some space" in str(e)
    e = write_error(safetensors.SafetensorError(ENOSPC_SAFETENSORS), tmp_path / "m.safetensors")
    assert e.errno == errno.ENOSPC
    # torch.save loses the errno: only a file system that is really full makes it a disk-full error
    assert write_error(RuntimeError(ENOSPC_TORCH), tmp_path / "x.pt").errno == errno.EIO
    monkeypatch.setattr(os, "statvfs", _disk_full_statvfs(os.statvfs))
    assert write_error(RuntimeError(ENOSPC_TORCH), tmp_path / "x.pt").errno == errno.ENOSPC
    ro = write_error(OSError(errno.EROFS, "Read-only file system"), tmp_path / "y")
    assert "read-only" in str(ro) and "another output directory" in str(ro)
    # not output faults: left alone
    assert write_error(ValueError("bad value"), tmp_path / "z") is None
    assert write_error(RuntimeError("shape mismatch"), tmp_path / "z") is None
    assert write_error(OSError(errno.ENOENT, "missing"), tmp_path / "z") is None


def test_atomic_write_on_full_disk_keeps_old_file_and_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")

    def half_then_full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OutputWriteError, match="no space left.*free some space"):
        atomic.atomic_write_with(p, half_then_full)
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_read_only_file_system_is_one_clear_error(tmp_path, monkeypatch):
    """Read-only output disk, simulated (root ignores chmod, so the permission test skips there)."""
    def erofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))
    monkeypatch.setattr(atomic.tempfile, "mkdtemp", erofs)
    with pytest.raises(OutputWriteError, match="read-only.*choose another output directory"), \
            atomic_directory(tmp_path / "ck"):
        pass
    assert not (tmp_path / "ck").exists()


def test_save_quantized_on_full_disk_leaves_nothing(tmp_path, monkeypatch):
    model, factory = tiny_model("llama")
    from morphoquant import quantize
    quantize(model, load_recipe("rtn-w4a4", {"weights": {"group_size": 16}}), [factory()], progress=False)
    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)          # the part that fitted
        raise safetensors.SafetensorError(ENOSPC_SAFETENSORS)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OutputWriteError, match="no space left") as ei:
        save_quantized(model, tmp_path / "ck", "rtn-w4a4", {}, verbose=False)
    assert "\n" not in str(ei.value)
    assert os.listdir(tmp_path) == []                       # no checkpoint, no .ck.tmp-* directory
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    save_quantized(model, tmp_path / "ck", "rtn-w4a4", {}, verbose=False)   # space freed: works
    assert (tmp_path / "ck" / "morphoquant.json").exists()


# ---------------------------------------------------------------- the CLI, disk full at each write
def _fail_layer_log(monkeypatch):
    real_open = open

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            self.f.close()
    monkeypatch.setattr(runner_module, "open", lambda p, mode="r", *a, **k: FullFile(real_open(p, mode, *a, **k)),
                        raising=False)


def _fail_resume_checkpoint(monkeypatch):
    real_save = torch.save

    def full(obj, f, *a, **k):
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 partial")
        raise RuntimeError(ENOSPC_TORCH)
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(os, "statvfs", _disk_full_statvfs(os.statvfs))
    return real_save


def _fail_checkpoint(monkeypatch):
    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise safetensors.SafetensorError(ENOSPC_SAFETENSORS)
    monkeypatch.setattr(safetensors.torch, "save_file", full)


def _fail_run_manifest(monkeypatch):
    real = cli._write_json

    def full(path, data):
        if path.name == "run.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)
    monkeypatch.setattr(cli, "_write_json", full)


@pytest.mark.parametrize("where, inject", [("layer log", _fail_layer_log),
                                           ("resume checkpoint", _fail_resume_checkpoint),
                                           ("quantized checkpoint", _fail_checkpoint),
                                           ("run manifest", _fail_run_manifest)])
def test_cli_disk_full_gives_one_line_exit_2_and_nothing_complete(tiny_cli, tmp_path, monkeypatch, capsys,
                                                                   where, inject):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        inject(m)
        rc = tiny_cli(out)
    err = _one_line(capsys.readouterr().err)
    assert rc == 2, where
    assert err.startswith("morphoquant: error: ") and "no space left" in err, err
    assert "free some space" in err and "--out" in err, err
    _assert_nothing_looks_complete(out)
    # space freed: the same command finishes (resuming where a checkpoint exists)
    assert tiny_cli(out) == 0
    assert (out / "rtn-w4a4" / "run.json").exists() and (out / "rtn-w4a4" / "checkpoint" / "morphoquant.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name == ".resume"]


def test_cli_disk_full_while_writing_the_report_fails_the_command(tiny_cli, tmp_path, monkeypatch, capsys):
    from morphoquant import report

    def full(*a, **k):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise report.ReportError(f"cannot write the report: {e}") from None
    monkeypatch.setattr(report, "build_report", full)
    assert tiny_cli(tmp_path / "out") == 2
    assert "no space left" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "out" / "report").exists()


# ---------------------------------------------------------------- a real full disk (tmpfs; needs root)
@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")

    def mount(size_kib: int) -> Path:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)],
                           check=False, capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        return mnt

    def resize(size_kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(mnt)], check=True)
    try:
        yield mount, resize
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)


def test_real_full_tmpfs_at_several_points_then_resume(tiny_cli, small_tmpfs, capsys):
    mount, resize = small_tmpfs
    mnt = mount(64 * 1024)
    assert tiny_cli(mnt / "ref") == 0
    total_kib = sum(p.stat().st_size for p in (mnt / "ref").rglob("*") if p.is_file()) // 1024
    capsys.readouterr()
    for frac in (0.01, 0.3, 0.75):       # the layer log / first block, mid-calibration, the checkpoint
        mnt = mount(max(8, int(frac * total_kib)))
        assert tiny_cli(mnt / "o") == 2, frac
        err = _one_line(capsys.readouterr().err)
        assert "no space left" in err and "--out" in err, (frac, err)
        _assert_nothing_looks_complete(mnt / "o")
        resize(64 * 1024)
        assert tiny_cli(mnt / "o") == 0, frac
        assert (mnt / "o" / "rtn-w4a4" / "run.json").exists()
        capsys.readouterr()
