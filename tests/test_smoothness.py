"""Finite differences and power iteration against exact autograd."""

import torch

from fedrobust.attacks.smoothness import fd_hvp, gradient_cosine, hessian_lambda_max, hvp, input_gradient


def _smooth_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()


def _exact_hessian(model, x1, y1):
    f = lambda z: torch.nn.functional.cross_entropy(model(z.view(1, *x1.shape)), y1.view(1), reduction="sum")  # noqa: E731
    return torch.autograd.functional.hessian(f, x1.flatten()).view(x1.numel(), x1.numel())


def test_hvp_matches_the_exact_hessian():
    model = _smooth_model()
    x = torch.rand(3, 1, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 3])
    v = torch.randn(3, 1, 3, 4, dtype=torch.float64)
    hv = hvp(model, x, y, v)
    for i in range(3):
        H = _exact_hessian(model, x[i], y[i])
        assert torch.allclose(hv[i].flatten(), H @ v[i].flatten(), atol=1e-10)


def test_finite_difference_hvp_converges_to_exact_as_h_shrinks():
    model = _smooth_model()
    x = torch.rand(4, 1, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    v = torch.randn_like(x)
    exact = hvp(model, x, y, v)
    errors = [float((fd_hvp(model, x, y, v, h) - exact).norm() / exact.norm()) for h in (1e-1, 1e-2, 1e-3, 1e-4)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3
    assert errors[0] / errors[2] > 50  # first-order convergence: 100x smaller h, ~100x smaller error


def test_input_gradient_matches_autograd():
    model = _smooth_model()
    x = torch.rand(2, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 2])
    torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    assert torch.allclose(input_gradient(model, x.detach(), y), x.grad)


def test_power_iteration_matches_known_hessian_to_1e_3():
    # Softmax regression: the input Hessian of CE is W^T (diag(p) - p p^T) W, known in closed form.
    torch.manual_seed(1)
    W, b = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    model = lambda z: z.flatten(1) @ W.T + b  # noqa: E731
    x = torch.rand(6, 1, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    lam = hessian_lambda_max(model, x, y, iters=500, tol=1e-12)
    for i in range(6):
        p = torch.softmax(model(x[i : i + 1]), 1)[0]
        H = W.T @ (torch.diag(p) - torch.outer(p, p)) @ W
        expected = torch.linalg.eigvalsh(H).max()
        assert float(abs(lam[i] - expected) / expected) < 1e-3


def test_power_iteration_on_a_small_network_matches_dense_eigenvalues():
    model = _smooth_model()
    x = torch.rand(3, 1, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    lam = hessian_lambda_max(model, x, y, iters=1000, tol=1e-12)
    for i in range(3):
        ev = torch.linalg.eigvalsh(_exact_hessian(model, x[i], y[i]))
        dominant = ev[ev.abs().argmax()]
        assert float(abs(lam[i] - dominant) / abs(dominant)) < 1e-3


def test_gradient_cosine_bounds():
    model = _smooth_model()
    neg = lambda z: -model(z)  # noqa: E731
    x = torch.rand(4, 1, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    assert torch.allclose(gradient_cosine(model, model, x, y), torch.ones(4, dtype=torch.float64))
    c = gradient_cosine(model, neg, x, y)
    assert bool(((c >= -1 - 1e-9) & (c <= 1 + 1e-9)).all())
