"""A run's TensorBoard scalars read back as the tests check them: over every events file of its one TensorBoard run
(a resumed run adds a file per process or per resume), in the order they were logged."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator, ScalarEvent


def logged(run: Path, tag: str) -> list[ScalarEvent]:
    """`tag`'s points in `run`'s one TensorBoard run, by the time they were logged: TensorBoard reads the files in
    name order, and two that one process writes in the same second differ only in its counter (`.9` after `.10`)."""
    (tensorboard,) = {p.parent for p in (run / "tensorboard").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    return sorted(events.Scalars(tag), key=lambda e: e.wall_time)
