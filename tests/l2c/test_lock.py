"""One job per output: a second embed-captions into a held --out is refused at once, naming the holder;
a holder killed with -9 leaves a lock the next job takes over."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from l2c.cli import main
from l2c.lock import LOCK, Locked, OutputLock
from l2c.storage import Store

HOLD = """
import sys, time
from l2c.lock import OutputLock
from l2c.storage import Store
OutputLock.acquire(Store(sys.argv[1]), "embed-captions")
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    proc.kill()
    proc.wait()


def test_second_job_is_refused_at_once_naming_the_first(holder, tmp_path, capsys):
    out, proc = holder
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"image_id": "a", "caption": "a dog"}) + "\n")
    t0 = time.monotonic()
    rc = main(["embed-captions", str(src), "--key-field", "image_id", "--text-field", "caption",
               "--out", str(out), "--model", "minilm", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and time.monotonic() - t0 < 20
    assert f"in use by another embed-captions job (pid {proc.pid} on" in err[0]
    assert not (out / "manifest.json").exists()  # refused before any work


def test_lock_of_a_killed_job_is_taken_over_and_released(holder):
    out, proc = holder
    with pytest.raises(Locked):
        OutputLock.acquire(Store(out), "embed-captions")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with OutputLock.acquire(Store(out), "embed-captions") as lock:
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid() == lock.info["pid"]
    assert not (out / LOCK).exists()
