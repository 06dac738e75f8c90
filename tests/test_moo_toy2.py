"""toy2 (CAGrad / Nash-MTL toy): the Task API, and MGDA reaching the Pareto front from the five
standard starts with a plain torch loop over dist_soup.moo (no engine)."""

import pytest
import torch

from dist_soup.moo.gram import local_grams
from dist_soup.moo.jacobian import jacobian
from dist_soup.moo.solvers import build
from dist_soup.tasks.base import Task
from dist_soup.tasks.toy2 import PARETO_X2, START_POINTS, Toy2Task, f1, f2, toy2_losses


def test_functions_match_the_published_definition():
    # Values by hand at points in both halves (c1 = 0 below the x1 axis, c2 = 0 above).
    x = torch.tensor([0.0, -8.0], dtype=torch.float64)
    t = torch.tanh(torch.tensor(4.0, dtype=torch.float64))
    assert float(f1(x)) == pytest.approx(float((49 / 10 - 20) * t))
    assert float(f2(x)) == pytest.approx(float((49 / 10 - 20) * t))
    y = torch.tensor([1.0, 2.0], dtype=torch.float64)
    c1 = torch.tanh(torch.tensor(1.0, dtype=torch.float64))
    th = torch.tanh(torch.tensor(-2.0, dtype=torch.float64))
    e1 = (torch.log((0.5 * (-1 - 7) - th).abs()) + 6) * c1
    e2 = (torch.log((0.5 * (-1 + 3) + th + 2).abs()) + 6) * c1
    assert float(f1(y)) == pytest.approx(float(e1))
    assert float(f2(y)) == pytest.approx(float(e2))
    both = toy2_losses(torch.stack([x, y]))
    assert both.shape == (2, 2)
    assert float(toy2_losses(y, scale=0.1)[0]) == pytest.approx(0.1 * float(e1))
    with pytest.raises(ValueError, match="shape"):
        f1(torch.zeros(3))


def test_task_api():
    task = Toy2Task(start=2)
    assert isinstance(task, Task)
    model = task.build_model(seed=0)
    assert [n for n, _ in model.named_parameters()] == ["trunk.x"]
    assert model.get_submodule(task.shared) is model.trunk
    assert model.trunk.x.tolist() == list(START_POINTS[2])
    assert task.train_size() == 1 and task.batch(torch.arange(1)) is None
    losses = task.losses(model, None)
    assert set(losses) == set(task.objectives) and all(v.dim() == 0 for v in losses.values())
    ev = task.evaluate(model)
    assert ev == {k: pytest.approx(float(v.detach())) for k, v in losses.items()}
    assert all(not m.higher_is_better for m in task.metrics.values())
    assert Toy2Task(start=(1.0, -2.0)).build_model(0).trunk.x.tolist() == [1.0, -2.0]
    for bad in (5, -1, (1.0,), "x", True):
        with pytest.raises(ValueError):
            Toy2Task(start=bad)


@pytest.mark.parametrize("start", range(len(START_POINTS)))
def test_mgda_reaches_the_pareto_front(start):
    torch.manual_seed(0)
    task = Toy2Task(start=start)
    model = task.build_model(seed=0)
    x = model.trunk.x
    steps = 500
    # Adam with a short second-moment memory: the gradients shrink by orders of magnitude
    # between the log valleys and the flat front, and a long memory would stall the descent.
    opt = torch.optim.Adam([x], lr=0.05, betas=(0.9, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, max(0.02, 3 * (1 - s / steps))))
    solver = build("mgda")
    for _ in range(steps):
        out = task.losses(model, task.batch(torch.arange(1)))
        losses = [out[name] for name in task.objectives]
        rows = jacobian(losses, [x], retain_graph=False)  # rows[0]: (K=2, 2)
        w = solver.weights(local_grams(rows)[0], torch.stack(losses).detach())
        x.grad = rows[0].T @ w
        opt.step()
        sched.step()
    x1, x2 = (float(v) for v in x.detach())
    assert -7.0 <= x1 <= 7.0
    # The front lies at x2 = -8.3552 for x1 = 0 and bends slightly lower towards x1 = +-7.
    assert abs(x2 - PARETO_X2) < 0.06, (x1, x2)
    # Pareto stationarity: the min-norm point of the hull of the two gradients vanishes.
    out = task.losses(model, None)
    losses = [out[name] for name in task.objectives]
    rows = jacobian(losses, [x])
    w = build("mgda").weights(local_grams(rows)[0], torch.ones(2))
    assert float((rows[0].T @ w).norm()) < 1e-3 * float(rows[0].norm(dim=1).max())
