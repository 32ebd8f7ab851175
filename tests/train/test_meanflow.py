"""The pMF loss (musetalk_fast/train/meanflow.py): the finite-difference JVP against torch.func.jvp in
float64, and the loss against an independent float64 computation."""
import numpy as np
import pytest
import torch

from musetalk_fast.train.meanflow import (DEFAULT_STEP, finite_difference_jvp, forward_mode_jvp, one_step, pmf_loss,
                                          sample_times)


class SmallNet(torch.nn.Module):
    """x = f(z, t, r): an MLP over the flattened latent with the times as inputs (smooth: tanh)."""

    def __init__(self, size, hidden=32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(size + 2, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, size))

    def forward(self, z, t, r):
        flat = z.flatten(1)
        out = self.net(torch.cat([flat, t[:, None], (t - r)[:, None]], 1))
        return out.view_as(z)


def _setup(dtype=torch.float64, batch=6, shape=(2, 3, 3), seed=0):
    torch.manual_seed(seed)
    size = int(np.prod(shape))
    net = SmallNet(size).to(dtype)
    x = torch.randn(batch, *shape, dtype=dtype)
    eps = torch.randn(batch, *shape, dtype=dtype)
    t, r = sample_times(batch, torch.Generator().manual_seed(seed), equal_share=0.3, dtype=dtype)
    return net, x, eps, t, r


def _predict(net):
    return lambda z, t, r, rows=None: net(z, t, r)


def test_sample_times_are_ordered_logit_normal_with_a_share_of_r_equal_t():
    t, r = sample_times(20000, torch.Generator().manual_seed(1), equal_share=0.75)
    assert bool(((0 < r) & (r <= t) & (t < 1)).all())
    assert abs((r == t).double().mean().item() - 0.75) < 0.02
    # logit(max of two N(-0.4, 1) draws) has mean -0.4 + 1/sqrt(pi)
    logit = torch.log(t / (1 - t)).double()
    assert abs(logit.mean().item() - (-0.4 + 1 / np.sqrt(np.pi))) < 0.03
    with pytest.raises(ValueError, match="equal_share"):
        sample_times(4, equal_share=1.5)


def test_finite_difference_jvp_matches_forward_mode_on_a_small_network():
    net, x, eps, t, r = _setup()
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
    v = eps - x
    exact = forward_mode_jvp(_predict(net), z, v, t, r)
    approx = finite_difference_jvp(_predict(net), z, v, t, r, step=1e-5)  # float64, no fast time embedding
    moving = (t > r)
    assert moving.any() and (~moving).any()
    assert exact[moving].abs().max() > 1e-3  # a real derivative, not zeros
    torch.testing.assert_close(approx, exact, rtol=1e-7, atol=1e-8)
    assert bool((approx[~moving] == 0).all())
    # float32 with the default step: rounding eps / h ~ 1e-3 of the derivative's scale
    approx32 = finite_difference_jvp(lambda zz, tt, rr, rows=None: net.float()(zz, tt, rr), z.float(), v.float(),
                                     t.float(), r.float())
    assert (approx32.double() - exact).abs().max() < 3e-3 * exact.abs().max()
    assert DEFAULT_STEP == 1e-4


def _independent_loss(net, x, eps, t, r):
    """Float64, straight from the definitions: u_theta(z, r, t) = (z - net(z, t, r)) / t as one function,
    its total derivative along (v, 1, 0) by torch.func.jvp on u itself, then numpy for the loss."""
    def u_fn(z, tt):
        return (z - net(z, tt, r)) / tt.view(-1, 1, 1, 1)

    tb = t.view(-1, 1, 1, 1)
    z = (1 - tb) * x + tb * eps
    v = eps - x
    with torch.no_grad():
        u, dudt = torch.func.jvp(u_fn, (z, t), (v, torch.ones_like(t)))
    u, dudt, v = u.numpy(), dudt.numpy(), v.numpy()
    gap = (t - r).numpy().reshape(-1, 1, 1, 1)
    per_sample = ((u + gap * dudt - v) ** 2).reshape(len(u), -1).mean(1)
    return per_sample, (per_sample / (per_sample + 0.01)).mean()


@pytest.mark.parametrize("jvp", ["finite_difference", "forward_mode"])
def test_pmf_loss_matches_an_independent_float64_computation(jvp):
    net, x, eps, t, r = _setup()
    out = pmf_loss(_predict(net), x, eps, t, r, jvp=jvp, step=1e-5)
    per_sample, weighted = _independent_loss(net, x, eps, t, r)
    np.testing.assert_allclose(out["mse"].numpy(), per_sample, rtol=1e-8)
    np.testing.assert_allclose(out["loss"].item(), weighted, rtol=1e-8)
    # the gradient flows through u only (sg on du/dt and on the weight): compare with autograd on that form
    out["loss"].backward()
    ours = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    tb, rb = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    z = (1 - tb) * x + tb * eps
    u = (z - net(z, t, r)) / tb
    target = torch.from_numpy((eps - x).numpy()) - (tb - rb) * out["dudt"]
    mse = (u - target).pow(2).flatten(1).mean(1)
    (mse / (torch.from_numpy(per_sample) + 0.01)).mean().backward()
    for a, p in zip(ours, net.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-7, atol=1e-12)


def _one_step_rows(t, r, rows):
    t, r = t.clone(), r.clone()
    t[rows], r[rows] = 1.0, 0.0
    return t, r


def test_pmf_residual_at_t_1_does_not_see_the_prediction_value():
    """At (t, r) = (1, 0): V - v = -dx/dt, so a network shifted by a constant scores the same there (the
    degenerate minimum boundary_rows removes), while rows with t < 1 see the shift."""
    net, x, eps, t, r = _setup()
    t, r = _one_step_rows(t, r, [0, 1])
    shift = torch.randn_like(x[:1])
    plain = pmf_loss(_predict(net), x, eps, t, r, jvp="forward_mode")
    shifted = pmf_loss(lambda z, tt, rr, rows=None: net(z, tt, rr) + shift, x, eps, t, r, jvp="forward_mode")
    torch.testing.assert_close(shifted["mse"][:2], plain["mse"][:2], rtol=1e-10, atol=1e-12)
    assert bool((shifted["mse"][2:] != plain["mse"][2:]).all())


@pytest.mark.parametrize("jvp", ["finite_difference", "forward_mode"])
def test_pmf_loss_boundary_rows_regress_on_x_and_leave_the_others(jvp):
    net, x, eps, t, r = _setup(batch=7)
    t, r = _one_step_rows(t, r, [1, 4])
    boundary = torch.zeros(7, dtype=torch.bool)
    boundary[[1, 4]] = True
    seen = []

    def predict(z, tt, rr, rows=None):
        seen.append((rows, rr.clone()))
        return net(z, tt, rr)

    out = pmf_loss(predict, x, eps, t, r, jvp=jvp, step=1e-5, boundary_rows=boundary)
    # the network's own call sees every row's r (the one-step rows keep r = 0); the JVP skips boundary rows
    assert seen[0][0] is None and torch.equal(seen[0][1], r)
    assert len(seen) > 1 and all(rows is not None and not bool(boundary[rows].any()) and torch.equal(rr, r[rows])
                                 for rows, rr in seen[1:])
    per_sample, _ = _independent_loss(net, x, eps, t, r)
    expected = per_sample.copy()
    with torch.no_grad():
        x_pred = net((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps, t, r)
    expected[[1, 4]] = ((x_pred - x)[[1, 4]] ** 2).flatten(1).mean(1).numpy()  # t = 1: ||u - v||^2 = ||x_pred - x||^2
    np.testing.assert_allclose(out["mse"].numpy(), expected, rtol=1e-7)
    np.testing.assert_allclose(out["loss"].item(), (expected / (expected + 0.01)).mean(), rtol=1e-7)
    # boundary rows at t < 1 get ||x_pred - x||^2 / t^2; all rows boundary: no JVP call at all
    seen.clear()
    every = torch.ones(7, dtype=torch.bool)
    out = pmf_loss(predict, x, eps, t, r, jvp=jvp, boundary_rows=every)
    assert len(seen) == 1
    with torch.no_grad():
        tb = t.view(-1, 1, 1, 1)
        x_pred = net((1 - tb) * x + tb * eps, t, r)
    np.testing.assert_allclose(out["mse"].numpy(), (((x_pred - x) / tb) ** 2).flatten(1).mean(1).numpy(), rtol=1e-10)
    with pytest.raises(ValueError, match="boundary_rows"):
        pmf_loss(predict, x, eps, t, r, boundary_rows=boundary[:3])
    with pytest.raises(ValueError, match="boundary_rows"):
        pmf_loss(predict, x, eps, t, r, boundary_rows=boundary.float())


def test_pmf_loss_rejects_bad_times_and_shapes():
    net, x, eps, t, r = _setup()
    with pytest.raises(ValueError, match="r <= t"):
        pmf_loss(_predict(net), x, eps, r, t.clone().fill_(1.0))
    with pytest.raises(ValueError, match="shape"):
        pmf_loss(_predict(net), x, eps[:, :1], t, r)
    assert one_step(_predict(net), eps).shape == x.shape


def test_finite_difference_jvp_matches_forward_mode_on_the_reference_op_unet():
    """The tiny U-Net, random weights everywhere (its zero-initialised output layers would make x = 0),
    float64, reference ops (they have forward-mode rules; ours do not): the default step's error is ~1e-3
    of the JVP's scale (the module docstring), and a row with r = t is skipped."""
    from musetalk_fast.model.config import ModelConfig
    from musetalk_fast.model.unet import MuseTalkUNet
    from musetalk_fast.ops import use_reference_ops

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine two spinning OpenMP threads are far slower (test_trainer.py)
    config = ModelConfig.named("tiny")
    unet = MuseTalkUNet(config).double().eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch, frames, size = 2, 1, config.latent_size
    shape = (batch, frames, config.vae.latent_channels, size, size)
    masked, reference = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    audio = torch.randn(batch, frames, config.audio.window_mels, config.audio.dim, dtype=torch.float64)
    codes = torch.randint(0, config.audio.codes, (batch, frames))

    def predict(z, t, r, rows=None):
        pick = slice(None) if rows is None else rows
        return unet(z, masked[pick], reference[pick], audio[pick], codes[pick], t, r)

    z, v = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    # a central row, a row at (t, r) = (1, 0) (backward stencil), a row at t = r + h / 2 (forward), r = t (skipped)
    t = torch.tensor([0.7, 1.0, 0.40005, 0.4], dtype=torch.float64)
    r = torch.tensor([0.2, 0.0, 0.4, 0.4], dtype=torch.float64)
    z, v = z.repeat(2, 1, 1, 1, 1), v.repeat(2, 1, 1, 1, 1)
    masked, reference, audio, codes = (a.repeat(2, *[1] * (a.dim() - 1)) for a in (masked, reference, audio, codes))
    with use_reference_ops():
        exact = forward_mode_jvp(predict, z, v, t, r)
        approx = finite_difference_jvp(predict, z, v, t, r)
    assert exact[:3].flatten(1).abs().amax(1).min() > 1.0 and bool((exact[3] == 0).all() and (approx[3] == 0).all())
    errors = [((approx[row] - exact[row]).abs().max() / exact[row].abs().max()).item() for row in range(3)]
    print("finite-difference JVP error / max |JVP| (central, backward, forward):", errors)
    assert errors[0] < 3e-3 and max(errors[1:]) < 1e-2  # one-sided stencils: ~4x the central's error constants
