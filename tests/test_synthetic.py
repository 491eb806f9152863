"""Tests of the tiny base model's cache (data/synthetic.py): processes building it at once, leftovers of a
killed build, the progress bar. They build a very small base in their own cache directory, never the
shared one.

Run: python -m pytest tests/test_synthetic.py -q
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from data.synthetic import build_tiny_base, tiny_base_path

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(steps=30, hidden_size=32, num_layers=1, batch_size=8)  # seconds to build, not minutes

# Each process imports everything first, then waits for the other at a file barrier, so that both look for
# the cache at the same moment (as tests and a training run started together on a fresh machine do).
BUILD_AFTER_BARRIER = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from data.synthetic import build_tiny_base
cache, barrier, me, overrides = sys.argv[2], Path(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
(barrier / me).touch()
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.005)
print("PATH", build_tiny_base(cache_dir=cache, **overrides))
"""


def test_two_processes_building_at_once_share_one_build(tmp_path):
    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    cache.mkdir()
    barrier.mkdir()
    # A build killed earlier left its temporary directory: it is removed, not kept forever.
    entry = tiny_base_path(str(cache), **SMALL)
    stale = entry.with_name(entry.name + ".tmp4194305")
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", BUILD_AFTER_BARRIER, str(ROOT), str(cache), str(barrier)]
    procs = [subprocess.Popen([*argv, name, json.dumps(SMALL)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-2000:]
    paths = {line.removeprefix("PATH ") for out, _ in results for line in out.splitlines()
             if line.startswith("PATH ")}
    assert paths == {str(entry)}
    assert (Path(paths.pop()) / "model.safetensors").is_file()
    # One process built it (with a progress bar: steps done of the total, and the time left); the other
    # waited for it and used the finished cache.
    built = [out + err for out, err in results if "building the tiny base model once" in out]
    assert len(built) == 1, results
    assert re.search(r"30/30 \[\d+:\d+<\d+:\d+", built[0]), built[0][-2000:]
    assert not [p.name for p in cache.iterdir() if ".tmp" in p.name]


def test_a_finished_cache_is_reused_without_building(tmp_path):
    logged = []
    first = build_tiny_base(cache_dir=str(tmp_path), log=logged.append, **SMALL)
    assert any("building" in line for line in logged)
    logged.clear()
    assert build_tiny_base(cache_dir=str(tmp_path), log=logged.append, **SMALL) == first
    assert logged == []
