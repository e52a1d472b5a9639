"""The step profiler: phases timed on a clock, nested phases subtracted from the outer one, medians over steps."""

import itertools

import pytest
import torch

from train.loop import profile
from train.loop.profile import PHASES, StepProfiler, phase, phase_table
from train.loop.run_files import PROFILE_FILE, PROFILE_TRACE_FILE


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(profile.time, "perf_counter", fake)
    return fake


def profiled_step(profiler: StepProfiler, clock: FakeClock, step: int, forward: float, loss: float) -> None:
    profiler.begin_step(step, data_seconds=0.5)
    with phase("loss"):
        clock.now += loss  # the loss's own work
        with phase("forward"):
            clock.now += forward
    with phase("backward"):
        clock.now += 2.0
    clock.now += 0.25  # between the phases: "other"
    profiler.end_step(step)


def test_phases_nest_and_add_up_to_the_step(tmp_path, clock):
    profiler = StepProfiler(3, total_steps=10, run_dir=tmp_path, device=torch.device("cpu"), is_main=True)
    assert (profiler.first, profiler.last) == (2, 4)
    with phase("forward"):  # no step is being profiled: nothing is recorded
        clock.now += 100
    profiler.begin_step(1, data_seconds=9.0)  # step 1 is the warm-up
    profiler.end_step(1)
    for step, forward in zip((2, 3, 4), (1.0, 3.0, 2.0), strict=True):
        clock.now += 0.5  # the data wait of begin_step
        profiled_step(profiler, clock, step, forward=forward, loss=0.125)
    medians = profiler.medians()
    assert medians["forward"] == 2.0 and medians["loss"] == 0.125  # the forward inside the loss is its own
    assert medians["data"] == 0.5 and medians["backward"] == 2.0 and medians["other"] == pytest.approx(0.25)
    assert medians["step"] == pytest.approx(0.5 + 2.0 + 0.125 + 2.0 + 0.25)
    assert profile._active is None  # phases outside profiled steps cost nothing
    assert profile_written(tmp_path)


def profile_written(run_dir) -> bool:
    text = (run_dir / PROFILE_FILE).read_text()
    return (
        text.startswith("# Profile of steps 2-4")
        and "| forward | 2.000 |" in text
        # each step's row: step 3 ran one forward pass of 3 s (data, to_device, forward, ..., other, whole step)
        and "| 3 | 1 | 0.500 | 0.000 | 3.000 | 0.000 | 0.125 | 2.000 | 0.000 | 0.000 | 0.000 | 0.000 | 0.250 | 5.875 |"
        in text
        and (run_dir / PROFILE_TRACE_FILE).exists()
    )


def test_a_whole_phase_keeps_the_phases_inside_it(tmp_path, clock):
    """The reference model's forward is the reference phase, not a forward."""
    profiler = StepProfiler(1, total_steps=5, run_dir=tmp_path, device=torch.device("cpu"), is_main=False)
    profiler.begin_step(2, data_seconds=0.0)
    with phase("loss"):
        with phase("forward"):
            clock.now += 1.0
        with phase("reference", whole=True), phase("forward"):
            clock.now += 4.0
    medians = profiler.end_step(2)
    assert (medians["forward"], medians["reference"], medians["loss"]) == (1.0, 4.0, 0.0)


def test_a_short_run_profiles_what_there_is_and_closing_stops_the_profiler(tmp_path, clock):
    short = StepProfiler(5, total_steps=3, run_dir=tmp_path, device=torch.device("cpu"), is_main=False)
    assert (short.first, short.last) == (2, 3)
    short.begin_step(2, data_seconds=0.0)
    short.close()  # a stop signal inside the profiled steps
    assert profile._active is None and short.torch_profiler is None
    assert not (tmp_path / PROFILE_FILE).exists()


def test_the_table_lists_every_phase_and_its_share():
    medians = dict(zip((*PHASES, "other"), itertools.repeat(0.1), strict=False)) | {"step": 1.0}
    table = phase_table(medians)
    assert table.count("\n") == len(PHASES) + 3 and "| backward | 0.100 | 10.0% |" in table
