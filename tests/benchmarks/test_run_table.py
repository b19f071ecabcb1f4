"""benchmarks/run_table.sh FINISHED_ONLY=1: only rows already finished are listed, nothing is quantized; a W8A8
sanity failure (exit 3) does not stop the table."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_finished_only_lists_finished_rows(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls.txt"
    for tool in ("morphoquant", "python"):      # record the command lines instead of running them
        # the W8A8 compare exits 3 (a row failed the sanity check): the table must still be merged
        fail = '[[ "$*" == *w8a8* ]] && exit 3\n' if tool == "morphoquant" else ""
        (fake / tool).write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> {calls}\n{fail}exit 0\n')
        (fake / tool).chmod(0o755)
    out = tmp_path / "tab"
    for fmt, rows in {"w4a4": ["rtn-w4a4", "morpho-gptq"], "w8a8": ["mbq-w4a4@w8a8"]}.items():
        for r in rows:
            (Path(f"{out}-{fmt}") / r).mkdir(parents=True)
            (Path(f"{out}-{fmt}") / r / "run.json").write_text("{}")
    (Path(f"{out}-w4a4") / "gptq-w4a4").mkdir()           # started, not finished: no run.json
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", FINISHED_ONLY="1",
               FORMATS="w4a4 w8a8 w4a16")
    subprocess.run(["bash", str(ROOT / "benchmarks" / "run_table.sh"), "smollm2-135m", str(out)], env=env,
                   check=True, capture_output=True, text=True, timeout=60)
    lines = calls.read_text().splitlines()
    compares = [ln for ln in lines if ln.startswith("morphoquant")]
    assert len(compares) == 2                                  # w4a16 has nothing finished: skipped
    assert "-r rtn-w4a4 " in compares[0] and "-r benchmarks/table/morpho-gptq.yaml" in compares[0]
    assert "-r gptq-w4a4 " not in compares[0] and f"--out {out}-w4a4" in compares[0]
    assert compares[1].count(" -r ") == 1 and "-r mbq-w4a4@w8a8" in compares[1]
    merge = [ln for ln in lines if ln.startswith("python")]
    assert merge and f"{out}-w4a4 {out}-w8a8" in merge[0] and f"{out}-w4a16" not in merge[0]
