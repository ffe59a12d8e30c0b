import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def binary():
    b = os.environ.get("SPARSE_TRAIN_BIN", str(REPO / "target/release/sparse-train"))
    if not os.path.exists(b):
        pytest.fail(f"{b} not built: run scripts/test.sh (or cargo build --release)")
    return b


def run(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([binary(), *args], cwd=REPO, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"sparse-train {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p
