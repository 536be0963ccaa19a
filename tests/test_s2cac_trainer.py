"""TimeBudget: the number of epochs fitted to a wall-clock budget."""

from __future__ import annotations

import time

import torch
from ignite.engine import Engine

from bundles.s2cac_coronary_calcium.scripts.trainer import TimeBudget


def run(budget_s, max_epochs=1000, multiple_of=1, step_s=0.01, epoch_length=2):
    engine = Engine(lambda e, b: time.sleep(step_s))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=max_epochs)
    TimeBudget(budget_s, sched, multiple_of=multiple_of).attach(engine)
    t0 = time.monotonic()
    engine.run(range(epoch_length), max_epochs=max_epochs)
    return engine.state, sched, time.monotonic() - t0


def test_epochs_fit_the_budget_and_the_lr_schedule_follows():
    state, sched, elapsed = run(budget_s=0.6)  # ~0.02 s per epoch -> about 30 epochs
    assert 10 <= state.max_epochs <= 40
    assert state.epoch == state.max_epochs
    assert sched.total_iters == state.max_epochs
    assert 0.3 < elapsed < 1.2


def test_epochs_are_a_multiple_of_the_validation_interval_and_at_most_max_epochs():
    state, _, _ = run(budget_s=0.6, multiple_of=7)
    assert state.max_epochs % 7 == 0 and state.epoch == state.max_epochs
    state, _, _ = run(budget_s=60, max_epochs=12)
    assert state.epoch == 12


def test_no_budget_leaves_max_epochs_alone():
    state, sched, _ = run(budget_s=None, max_epochs=5)
    assert state.epoch == 5 and sched.total_iters == 5
