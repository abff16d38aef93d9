"""A fast version of the diagonal-linear-network experiment (paper Fig. 2): the mixed-sign construction, and
PILoT with a geometric alpha schedule beating LASSO and spred."""
from __future__ import annotations

import math

import torch

from pilot.experiments.diag_linear import SIGN_FLIPS, Config, format_table, make_problem, plot, run


def test_problem_has_mixed_signs_that_spred_cannot_flip() -> None:
    for seed in range(3):
        problem = make_problem(seed)
        assert problem.Z.shape == (40, 100) and problem.y.shape == (40,)
        torch.testing.assert_close(problem.y, problem.Z @ problem.x_star)
        support = problem.x_star != 0
        assert int(support.sum()) == 5
        assert (problem.x_star > 0).any() and (problem.x_star < 0).any()
        flipped = int((torch.sign(problem.x_star[support]) != torch.sign(problem.x0[support])).sum())
        assert flipped == sum(SIGN_FLIPS) == 3
    assert not torch.equal(make_problem(0).x0, make_problem(1).x0)


def test_pilot_beats_lasso_and_spred(tmp_path) -> None:
    config = Config(steps=1000, seeds=(0, 1), lasso_l1=(1e-2, 1e-1))
    results = run(config)
    mean = {label: sum(finals) / len(finals) for label, finals in results.finals.items()}
    pilot = mean["PILoT geometric"]
    assert pilot < 1e-2
    assert pilot < min(value for label, value in mean.items() if label.startswith("LASSO"))
    assert all(mean[f"spred {schedule}"] > 0.5 for schedule in config.schedules)
    assert mean["PILoT constant"] > 10 * pilot  # constant alpha keeps shrinking: biased
    assert all(len(curve) == config.steps and all(map(math.isfinite, curve)) for curve in results.curves.values())
    table = format_table(results)
    assert "PILoT geometric" in table and "LASSO l1=0.01" in table
    plot(results, str(tmp_path / "diag.png"))
    assert (tmp_path / "diag.png").stat().st_size > 0
