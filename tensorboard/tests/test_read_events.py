"""Event files from sparse-tensorboard, read back by TensorBoard's own EventAccumulator.

The writer is the `write_events` example: a first run logs steps 0..STEPS, then a resumed run
marks a restart at RESUME and logs RESUME..STEPS+5. Set WRITE_EVENTS_BIN to a built example to
skip `cargo run`.
"""

import os
import subprocess
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
RESUME = 12
END = STEPS + 5


def write_events(log_dir: Path) -> None:
    args = [str(log_dir), str(STEPS), str(RESUME)]
    binary = os.environ.get("WRITE_EVENTS_BIN")
    if binary:
        cmd = [binary, *args]
    else:
        cmd = ["cargo", "run", "-q", "-p", "sparse-tensorboard", "--example", "write_events", "--", *args]
    subprocess.run(cmd, cwd=REPO, check=True)


@pytest.fixture(scope="module")
def accumulator(tmp_path_factory) -> EventAccumulator:
    log_dir = tmp_path_factory.mktemp("tb")
    write_events(log_dir)
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def test_two_event_files_with_distinct_names(accumulator):
    files = sorted(p.name for p in Path(accumulator.path).iterdir())
    assert len(files) == 2
    assert all(name.startswith("events.out.tfevents.") for name in files)


def test_expected_tags(accumulator):
    assert sorted(accumulator.Tags()["scalars"]) == ["train/loss", "train/lr"]


def test_steps_have_no_overlap_after_restart(accumulator):
    for tag in ("train/loss", "train/lr"):
        steps = [e.step for e in accumulator.Scalars(tag)]
        assert steps == list(range(END)), tag


def test_values_come_from_the_run_that_logged_them_last(accumulator):
    loss = {e.step: e.value for e in accumulator.Scalars("train/loss")}
    lr = {e.step: e.value for e in accumulator.Scalars("train/lr")}
    for step in range(RESUME):
        assert loss[step] == pytest.approx(1.0 / (step + 1)), step
        assert lr[step] == pytest.approx(0.001), step
    for step in range(RESUME, END):
        assert loss[step] == pytest.approx(100.0 + step), step
        assert lr[step] == pytest.approx(0.002), step


def test_wall_times_are_current(accumulator):
    import time

    for event in accumulator.Scalars("train/loss"):
        assert abs(event.wall_time - time.time()) < 600
