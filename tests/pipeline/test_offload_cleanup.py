"""Offloaded activations never outlive their run: SIGTERM unwinds, and a killed run's leftovers are removed."""
import os
import signal
import subprocess
import sys
import textwrap

import torch

from morphoquant.pipeline.runner import OFFLOAD_PREFIX, ActivationStore, remove_stale_offload_dirs


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_offload_dirs_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / f"{OFFLOAD_PREFIX}{_dead_pid()}-abc"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "0.pt").write_bytes(b"x" * 10)
    alive = tmp_path / f"{OFFLOAD_PREFIX}{os.getppid()}-def"      # our parent: certainly alive
    alive.mkdir()
    mine = tmp_path / f"{OFFLOAD_PREFIX}{os.getpid()}-ghi"
    mine.mkdir()
    old_style = tmp_path / f"{OFFLOAD_PREFIX}x1y2z3w4"               # no pid in the name: cannot tell, kept
    old_style.mkdir()
    other = tmp_path / "unrelated-123-dir"
    other.mkdir()

    assert remove_stale_offload_dirs(tmp_path) == [dead]
    assert not dead.exists()
    assert alive.exists() and mine.exists() and old_style.exists() and other.exists()


def test_offloading_store_cleans_leftovers_and_its_own_directory(tmp_path):
    dead = tmp_path / f"{OFFLOAD_PREFIX}{_dead_pid()}-zz"
    dead.mkdir()
    store = ActivationStore(offload=True, tmp_root=tmp_path)
    assert not dead.exists()
    store.append(torch.arange(4.0))
    assert torch.equal(store[0], torch.arange(4.0))
    (own,) = tmp_path.glob(f"{OFFLOAD_PREFIX}{os.getpid()}-*")
    assert len(list(own.iterdir())) == 1
    store.close()
    assert not own.exists()


def test_sigterm_during_a_cli_command_removes_the_offload_directory(tmp_path):
    # the CLI's entry point turns SIGTERM into SystemExit: the store's temp directory goes at interpreter exit
    script = textwrap.dedent(f"""
        import argparse, sys, time, torch
        import morphoquant.cli.main as cli
        from morphoquant.pipeline.runner import ActivationStore

        def work(args):
            store = ActivationStore(offload=True, tmp_root={str(tmp_path)!r})
            store.append(torch.zeros(1000))
            print("ready", flush=True)
            time.sleep(60)

        parser = argparse.ArgumentParser()
        parser.set_defaults(func=work, quiet=True, threads=None)
        cli.build_parser = lambda: parser
        sys.exit(cli.main([]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert len(list(tmp_path.glob(f"{OFFLOAD_PREFIX}*"))) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.glob(f"{OFFLOAD_PREFIX}*")) == []
