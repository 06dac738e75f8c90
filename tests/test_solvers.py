"""dist_soup.moo.solvers against independent references (torchjd, grids, certificates)."""

import math

import numpy as np
import pytest
import torch

from dist_soup.moo import solvers
from dist_soup.moo.solvers import build

GRAM_SOLVERS = ["mgda", "modo", "cagrad", "pcgrad", "upgrad", "nash"]
ALL = list(solvers.names())


def _jac(k, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, generator=g, dtype=torch.float64)


def _losses(k, seed=0):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.rand(k, generator=g, dtype=torch.float64) + 0.5


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _project_simplex_bisect(v):
    """Simplex projection by bisection on the threshold (independent of the solver's sort)."""
    lo, hi = float(v.min()) - 1.0, float(v.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - hi, 0)


# ---------------------------------------------------------------- registry and contract


def test_registry_and_build_errors():
    assert set(ALL) >= {"ew", "mgda", "modo", "cagrad", "pcgrad", "upgrad", "famo", "dwa", "nash"}
    with pytest.raises(ValueError, match="unknown solver"):
        build("adam")
    with pytest.raises(ValueError, match="unknown options"):
        build("mgda", gamma=1.0)
    with pytest.raises(ValueError, match="normalization"):
        build("mgda", normalization="l1")
    with pytest.raises(ValueError, match="gamma"):
        build("modo", gamma=0.0)
    with pytest.raises(ValueError, match="rescale"):
        build("cagrad", rescale=3)
    for name in ("ew", "famo", "dwa"):
        assert build(name).needs_gram is False
    for name in GRAM_SOLVERS:
        assert build(name).needs_gram is True
    assert build("modo").needs_psd is False and build("mgda").needs_psd is True


def test_registry_imports_lazily_and_registers_new_names():
    from dist_soup._registry import Registry

    reg: Registry[solvers.Solver] = Registry("solver", solvers.Solver, {"mine": "dist_soup.moo.solvers.scalar:EW"})
    assert reg.names() == ("mine",) and reg.get("mine") is solvers.solver_class("ew")
    reg.register("mgda2", solvers.solver_class("mgda"))
    assert reg.build("mgda2", momentum=0.5).momentum == 0.5
    with pytest.raises(ValueError, match="already registered"):
        reg.register("mine", solvers.solver_class("ew"))
    with pytest.raises(TypeError, match="subclass of Solver"):
        reg.register("bad", int)
    with pytest.raises(
        ValueError, match=r"got unknown options \['gama'\]; allowed: normalization='none', momentum=0.0"
    ):
        reg.build("mgda2", gama=1.0)
    broken: Registry[solvers.Solver] = Registry("solver", solvers.Solver, {"x": "collections:OrderedDict"})
    with pytest.raises(TypeError, match="not a subclass of Solver"):
        broken.get("x")


@pytest.mark.parametrize("name", ALL)
def test_zero_gram_gives_finite_weights(name):
    for k in (1, 2, 4):
        w = build(name).weights(torch.zeros(k, k), torch.ones(k))
        assert w.shape == (k,) and w.dtype == torch.float32
        assert torch.isfinite(w).all()


@pytest.mark.parametrize("name", GRAM_SOLVERS)
def test_non_finite_gram_raises(name):
    for bad in (float("nan"), float("inf")):
        g = torch.eye(3)
        g[0, 1] = bad
        with pytest.raises(ValueError, match="non-finite"):
            build(name).weights(g, torch.ones(3))


@pytest.mark.parametrize("name", ALL)
def test_shape_and_loss_errors(name):
    s = build(name)
    with pytest.raises(ValueError, match="shape"):
        s.weights(torch.eye(3), torch.ones(2))
    with pytest.raises(ValueError, match="not finite"):
        s.weights(torch.eye(2), torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("name", ["mgda", "cagrad", "upgrad", "pcgrad", "nash"])
def test_psd_solvers_clip_an_indefinite_gram(name):
    from dist_soup.moo.gram import psd_clip

    j = _jac(3, 5, 11)
    g = j @ j.T
    g[0, 0] -= 4.0 * float(g[0, 0])  # indefinite, as a noisy cross-worker estimate can be
    assert float(torch.linalg.eigvalsh(g).min()) < 0
    w = build(name).weights(g, torch.ones(3))
    torch.testing.assert_close(w, build(name).weights(psd_clip(g), torch.ones(3)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- MGDA


def _mgda_certificate(g, w, tol):
    """KKT of min w^T G w on the simplex: (G w)_i >= w^T G w for all i, equality on the support."""
    gw = g @ w
    val = float(w @ gw)
    scale = float(np.abs(g).max())
    assert np.all(gw >= val - tol * scale), (gw, val)
    assert abs(w.sum() - 1) < 1e-6 and np.all(w >= -1e-7)


def test_mgda_kkt_certificate_random_and_rank_deficient():
    for k in range(2, 9):
        for n in (2, 50):  # n < K: singular Gram, origin possibly in the hull
            j = _jac(k, n, 10 * k + n).numpy()
            g = j @ j.T
            w = build("mgda").weights(torch.from_numpy(g), torch.ones(k)).double().numpy()
            _mgda_certificate(g, w, 1e-6)


def test_mgda_k2_closed_form():
    j = _jac(2, 7, 3)
    g1, g2 = j[0], j[1]
    a = float(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)))
    a = min(max(a, 0.0), 1.0)
    w = build("mgda").weights(j @ j.T, torch.ones(2))
    torch.testing.assert_close(w, torch.tensor([a, 1 - a], dtype=torch.float32))
    # g1 . g2 >= |g1|^2: the min-norm point is g1 itself.
    j2 = torch.tensor([[1.0, 0.0], [2.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(build("mgda").weights(j2 @ j2.T, torch.ones(2)), torch.tensor([1.0, 0.0]))


def test_mgda_vs_fine_grid_k3():
    j = _jac(3, 5, 7).numpy()
    g = j @ j.T
    steps = 600
    a, b = np.meshgrid(np.arange(steps + 1), np.arange(steps + 1), indexing="ij")
    keep = a + b <= steps
    w_grid = np.stack([a[keep], b[keep], steps - a[keep] - b[keep]], axis=1) / steps
    vals = np.einsum("ni,ij,nj->n", w_grid, g, w_grid)
    best = w_grid[np.argmin(vals)]
    w = build("mgda").weights(torch.from_numpy(g), torch.ones(3)).double().numpy()
    assert float(w @ g @ w) <= vals.min() + 1e-7
    assert np.abs(w - best).max() <= 2.0 / steps


def _project_simplex_sort(v):
    """Simplex projection (Duchi et al. 2008), written here independently of the solvers."""
    mu = np.sort(v)[::-1]
    cums = np.cumsum(mu)
    rho = np.nonzero(mu * np.arange(1, v.size + 1) > (cums - 1))[0][-1]
    return np.maximum(v - (cums[rho] - 1) / (rho + 1.0), 0)


def test_mgda_vs_long_projected_gradient():
    for k in (4, 6):
        j = _jac(k, 30, 100 + k).numpy()
        g = j @ j.T
        lr = 1.0 / np.linalg.eigvalsh(g).max()
        # FISTA (accelerated projected gradient), long enough to be exact to ~1e-10 here.
        w_ref = y = np.full(k, 1.0 / k)
        t = 1.0
        for _ in range(4000):
            w_new = _project_simplex_sort(y - lr * (g @ y))
            t_new = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
            y = w_new + ((t - 1) / t_new) * (w_new - w_ref)
            w_ref, t = w_new, t_new
        w = build("mgda").weights(torch.from_numpy(g), torch.ones(k)).double().numpy()
        assert float(w @ g @ w) <= float(w_ref @ g @ w_ref) * (1 + 1e-6)
        assert np.linalg.norm(j.T @ w - j.T @ w_ref) <= 1e-4 * np.linalg.norm(j.T @ w_ref)


def test_mgda_matches_torchjd():
    agg = pytest.importorskip("torchjd.aggregation")
    for k in range(2, 7):
        j = _jac(k, 20, 200 + k)
        w = build("mgda").weights(j @ j.T, _losses(k)).double()
        ref = agg.MGDA(epsilon=1e-12, max_iters=5000)(j)
        # Frank-Wolfe approaches the optimum from above, slowly (error ~ 1/t): ours is at
        # least as short and close.
        assert float((j.T @ w).norm()) <= float(ref.norm()) * (1 + 1e-6)
        assert _rel(j.T @ w, ref) < 1e-2


def test_mgda_normalizations_follow_libmtl():
    k = 3
    j = _jac(k, 10, 5) * torch.tensor([[1.0], [5.0], [0.2]], dtype=torch.float64)
    losses = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    norms = j.norm(dim=1)
    for mode, gn in (("none", torch.ones(k)), ("l2", norms), ("loss", losses), ("loss+", losses * norms)):
        jn = j / gn.unsqueeze(1)
        sol = build("mgda").weights(jn @ jn.T, losses).double()  # min-norm of normalized rows
        w = build("mgda", normalization=mode).weights(j @ j.T, losses).double()
        # LibMTL's update is sum_k sol_k g_k / gn_k.
        torch.testing.assert_close(j.T @ w, jn.T @ sol, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="positive losses"):
        build("mgda", normalization="loss").weights(j @ j.T, torch.tensor([1.0, -1.0, 1.0]))


# ---------------------------------------------------------------- torchjd references


def test_upgrad_matches_torchjd():
    pytest.importorskip("qpsolvers")
    pytest.importorskip("quadprog")
    agg = pytest.importorskip("torchjd.aggregation")
    from torchjd._linalg import QuadprogProjector

    for k in range(2, 7):
        j = _jac(k, 20, 300 + k)
        w = build("upgrad").weights(j @ j.T, _losses(k)).double()
        ref = agg.UPGrad(projector=QuadprogProjector(norm_eps=0.0, reg_eps=1e-12))(j)
        assert _rel(j.T @ w, ref) < 1e-5
        # The direction is in the dual cone: it increases no loss to first order.
        assert torch.all(j @ (j.T @ w) >= -1e-5 * float(j.norm() ** 2))
        # torchjd's default projector regularizes (1e-4 of the trace): close, not equal.
        assert _rel(j.T @ w, agg.UPGrad()(j)) < 1e-2


def test_cagrad_matches_torchjd_and_is_optimal():
    pytest.importorskip("cvxpy")
    agg = pytest.importorskip("torchjd.aggregation")
    c = 0.5
    for k in range(2, 7):
        j = _jac(k, 20, 400 + k)
        g = (j @ j.T).numpy()
        w = build("cagrad", c=c, rescale=0).weights(j @ j.T, _losses(k)).double()
        ref = agg.CAGrad(c=c, norm_eps=0.0)(j)
        # cvxpy/Clarabel runs to its default tolerance: agreement to ~1e-4.
        assert _rel(j.T @ w, ref) < 1e-3
        # Certificate of the dual: w_dual from lambda = b + (s/||g_w||) w_dual.
        b = np.full(k, 1.0 / k)
        s = c * math.sqrt(b @ g @ b)
        wd = w.numpy() - b
        wd = wd / wd.sum()
        gw = math.sqrt(wd @ g @ wd)
        grad = g @ b + s * (g @ wd) / gw
        assert np.all(grad >= grad @ wd - 1e-6 * np.abs(g).max())
        # Rescale options divide the same direction.
        w1 = build("cagrad", c=c).weights(j @ j.T, _losses(k)).double()
        w2 = build("cagrad", c=c, rescale=2).weights(j @ j.T, _losses(k)).double()
        torch.testing.assert_close(w1 * (1 + c**2), w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w2 * (1 + c), w, rtol=1e-5, atol=1e-6)
    assert torch.allclose(build("cagrad", c=0.0).weights(j @ j.T, _losses(k)), torch.full((k,), 1.0 / k))


def test_pcgrad_matches_torchjd_with_the_same_orders():
    agg = pytest.importorskip("torchjd.aggregation")
    for k in range(2, 7):
        j = _jac(k, 20, 500 + k)
        seed = 17 + k
        torch.manual_seed(seed)  # torchjd draws its orders from the global generator
        ref = agg.PCGrad()(j)
        w = build("pcgrad", seed=seed).weights(j @ j.T, _losses(k)).double()
        assert _rel(j.T @ w, ref) < 1e-6


def test_pcgrad_by_hand_k2_and_reproducible():
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    j = torch.stack([g1, g2])
    pc1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    pc2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    w = build("pcgrad").weights(j @ j.T, torch.ones(2)).double()
    torch.testing.assert_close(j.T @ w, pc1 + pc2)
    j5 = _jac(5, 8, 9)
    a, b = build("pcgrad", seed=3), build("pcgrad", seed=3)
    for _ in range(3):
        torch.testing.assert_close(a.weights(j5 @ j5.T, torch.ones(5)), b.weights(j5 @ j5.T, torch.ones(5)))
    state = a.state_dict()
    nxt = a.weights(j5 @ j5.T, torch.ones(5))
    c = build("pcgrad", seed=99)
    c.load_state_dict(state)
    torch.testing.assert_close(c.weights(j5 @ j5.T, torch.ones(5)), nxt)


# ---------------------------------------------------------------- MoDo


def test_modo_step_by_hand_and_vs_torchjd():
    k, gamma, rho = 4, 0.05, 0.1
    s = build("modo", gamma=gamma, rho=rho)
    lam = np.full(k, 1.0 / k)
    ref_agg = None
    try:
        from torchjd.aggregation import MoDoWeighting

        ref_agg = MoDoWeighting(gamma=gamma, rho=rho)
    except ImportError:
        pass
    for t in range(6):
        j = _jac(k, 6, 600 + t)
        g = (j @ j.T).numpy()
        lam = _project_simplex_bisect(lam - gamma * (g @ lam + rho * lam))
        w = s.weights(torch.from_numpy(g), torch.ones(k)).double().numpy()
        assert np.abs(w - lam).max() < 1e-6
        if ref_agg is not None:
            ref = ref_agg(torch.from_numpy(g)).numpy()
            assert np.abs(w - ref).max() < 1e-6
    # Defaults as LibMTL; state round trip continues identically.
    d = build("modo")
    assert (d.gamma, d.rho) == (1e-3, 0.1)
    st = s.state_dict()
    s2 = build("modo", gamma=gamma, rho=rho)
    s2.load_state_dict(st)
    g = torch.from_numpy((_jac(k, 6, 7) @ _jac(k, 6, 7).T).numpy())
    torch.testing.assert_close(s.weights(g, torch.ones(k)), s2.weights(g, torch.ones(k)))
    # Indefinite input (the cross estimate) is accepted.
    assert torch.isfinite(build("modo").weights(torch.tensor([[-1.0, 2.0], [2.0, -3.0]]), torch.ones(2))).all()


# ---------------------------------------------------------------- loss-based


def test_famo_matches_a_torch_adam_reference():
    k, gamma, w_lr = 3, 0.01, 0.025
    gen = torch.Generator().manual_seed(0)
    seq = [torch.rand(k, generator=gen, dtype=torch.float64) * 2 + 0.1 for _ in range(8)]
    # Reference: the official structure with torch.optim.Adam on the logits.
    logits = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=w_lr, weight_decay=gamma)
    s = build("famo", gamma=gamma, w_lr=w_lr)
    prev = None
    for t, losses in enumerate(seq):
        if prev is not None:
            delta = (prev + 1e-8).log() - (losses + 1e-8).log()
            d = torch.autograd.grad(torch.softmax(logits, -1), logits, grad_outputs=delta)[0]
            opt.zero_grad()
            logits.grad = d
            opt.step()
        z = torch.softmax(logits.detach(), -1)
        dl = losses + 1e-8
        c = (z / dl).sum()
        ref = z / (c * dl)  # gradient weights of sum_k (z_k / c) log D_k
        w = s.weights(None, losses)
        torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=1e-7)
        assert abs(float(w.sum()) - 1) < 1e-5
        prev = losses
        if t == 4:
            state = s.state_dict()
            twin = build("famo", gamma=gamma, w_lr=w_lr)
            twin.load_state_dict(state)
    # The twin restored after call 4 continues exactly like a fresh replay of calls 0..4.
    twin_w = [twin.weights(None, losses) for losses in seq[5:]]
    again = build("famo", gamma=gamma, w_lr=w_lr)
    for losses in seq[:5]:
        again.weights(None, losses)
    for losses, tw in zip(seq[5:], twin_w):
        torch.testing.assert_close(again.weights(None, losses), tw)
    with pytest.raises(ValueError, match="exceed min_losses"):
        build("famo").weights(None, torch.tensor([1.0, -2.0]))


def test_famo_learns_to_favour_the_slow_objective():
    s = build("famo", w_lr=0.1)
    losses = torch.tensor([1.0, 1.0], dtype=torch.float64)
    for _ in range(50):
        _ = s.weights(None, losses)
        losses = losses * torch.tensor([0.9, 0.99], dtype=torch.float64)  # objective 0 improves faster
    # Logits move towards the slow objective 1.
    assert s.logits()[1] > s.logits()[0]


def test_dwa_formula():
    s = build("dwa", T=2.0)
    seq = [
        torch.tensor(v, dtype=torch.float64)
        for v in ([1.0, 2.0, 3.0], [0.5, 2.0, 2.0], [0.4, 1.0, 2.0], [0.1, 1.0, 1.0])
    ]
    torch.testing.assert_close(s.weights(None, seq[0]), torch.ones(3))
    torch.testing.assert_close(s.weights(None, seq[1]), torch.ones(3))
    for t in (2, 3):
        r = seq[t - 1] / seq[t - 2]
        ref = 3 * torch.softmax(r / 2.0, 0)
        torch.testing.assert_close(s.weights(None, seq[t]).double(), ref, rtol=1e-6, atol=1e-7)
    st = s.state_dict()
    s2 = build("dwa")
    s2.load_state_dict(st)
    x = torch.tensor([0.2, 0.3, 0.4])
    torch.testing.assert_close(s.weights(None, x), s2.weights(None, x))


def test_ew():
    torch.testing.assert_close(build("ew").weights(None, torch.ones(4)), torch.ones(4))


# ---------------------------------------------------------------- Nash-MTL


def test_nash_solves_the_bargaining_condition():
    for k in range(2, 7):
        j = _jac(k, 15, 700 + k)
        g = (j @ j.T).numpy()
        a = build("nash", reg_eps=0.0).weights(torch.from_numpy(g), torch.ones(k)).double().numpy()
        gn = g / np.linalg.norm(g)
        assert np.all(a > 0)
        np.testing.assert_allclose(gn @ a, 1.0 / a, rtol=1e-5)
    # A zero gradient row: finite (regularized) weights.
    j = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    w = build("nash").weights(j @ j.T, torch.ones(3))
    assert torch.isfinite(w).all() and (w > 0).all()


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_is_torch_serializable(name, tmp_path):
    s = build(name)
    for t in range(3):
        j = _jac(3, 6, 800 + t)
        s.weights(j @ j.T, _losses(3, t))
    path = tmp_path / "s.pt"
    torch.save(s.state_dict(), path)
    twin = build(name)
    twin.load_state_dict(torch.load(path, weights_only=True))
    j = _jac(3, 6, 900)
    torch.testing.assert_close(s.weights(j @ j.T, _losses(3, 9)), twin.weights(j @ j.T, _losses(3, 9)))
