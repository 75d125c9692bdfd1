"""Fixtures of the interop tier (`make test-interop`): the reference libraries run in .venv-interop, called as a
subprocess (tests/interop/reference.py); l2c runs here. Skipped where .venv-interop is not built."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.interop.data import ROOT, SHARED, interop_captions

REFERENCE = Path(__file__).with_name("reference.py")


def interop_python() -> Path | None:
    p = Path(os.environ.get("L2C_INTEROP_PYTHON", ROOT / ".venv-interop" / "bin" / "python"))
    return p if p.exists() else None


requires_interop = pytest.mark.skipif(
    interop_python() is None, reason="needs .venv-interop (make install-interop; `make test-interop` runs these)"
)


def pytest_collection_modifyitems(config, items):
    """Only `-m interop` (make test-interop) or `-m vllm` (make test-vllm) runs this tier: a plain `make test`
    leaves it to its own target, whether or not .venv-interop happens to exist."""
    expr = config.getoption("markexpr") or ""
    if "interop" in expr or "vllm" in expr:
        return
    skip = pytest.mark.skip(reason="the interop tier runs with `make test-interop`")
    for item in items:
        if "interop" in item.keywords:
            item.add_marker(skip)


def run_reference(*args) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([str(interop_python()), str(REFERENCE), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, f"reference.py {args[0]} failed:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    """The tiny released-layout Llama-3-style teacher, made by the reference venv."""
    out = tmp_path_factory.mktemp("interop") / "tiny-llm2clip-teacher"
    run_reference("teacher", out, SHARED)
    return out


@pytest.fixture(scope="session")
def captions_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("interop-captions") / "captions.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in interop_captions()))
    return p


@pytest.fixture(scope="session")
def llm2vec_ref(teacher, captions_file, tmp_path_factory) -> dict:
    """llm2vec's vectors (float32 and bfloat16), token ids and pooled-token counts, by key."""
    out = tmp_path_factory.mktemp("interop-ref") / "llm2vec.npz"
    run_reference("llm2vec", teacher, captions_file, out)
    d = dict(np.load(out))
    offsets = np.concatenate([[0], np.cumsum(d.pop("ids_len"))])
    flat = d.pop("ids_flat")
    d["ids"] = [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
    d["keys"] = [str(k) for k in d["keys"]]
    d["rows"] = [json.loads(ln) for ln in captions_file.read_text().splitlines()]
    return d


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
