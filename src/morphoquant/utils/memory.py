"""Peak resident memory of this process (stand-alone: no package imports, so scripts running in another
environment can load this file, as ``scripts/peer_llmcompressor.py`` does)."""
from __future__ import annotations

import resource
from pathlib import Path


def reset_peak_rss() -> bool:
    """Lower the kernel's peak-RSS mark of this process to its current RSS (Linux ≥ 4.0: ``5`` written to
    ``/proc/self/clear_refs``), so that :func:`peak_rss_mb` measures from here — one row of ``compare`` rather
    than the largest row run before it in the same process. False where the system does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process image (MiB): ``VmHWM`` of ``/proc/self/status`` (since start or the
    last :func:`reset_peak_rss`); ``ru_maxrss`` where ``/proc`` is missing. ``VmHWM`` rather than ``ru_maxrss``
    also because Linux carries a parent's ``ru_maxrss`` through fork + exec: a worker started by a driver holding
    a model would report the driver's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
