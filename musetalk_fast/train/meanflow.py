"""The pixel-MeanFlow (pMF) objective on the U-Net's x-prediction.

MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447) trains
the average velocity u(z_t, r, t) = 1/(t - r) * integral_r^t v(z_s, s) ds (eq. 3) of the flow
z_t = (1 - t) x + t eps, whose conditional velocity is v = dz_t/dt = eps - x (eq. 1-2). Differentiating
(t - r) u in t gives the MeanFlow identity (eq. 6)

    u(z_t, r, t) = v(z_t, t) - (t - r) du/dt,   du/dt = v . d_z u + d_t u   (eq. 8, the JVP along (v, 0, 1)
                                                                              over (z, r, t))

and the loss || u_theta - sg(v - (t - r) du/dt) ||^2 (eq. 9-10). pMF (Lu et al. 2026, "One-step
Latent-free Image Generation with Pixel Mean Flows", arXiv 2601.22158) lets the network predict the
clean x and maps it to the average velocity u = (z_t - x_theta) / t; the loss stays in velocity space,
written with a compound prediction V = u + (t - r) sg(du/dt) against the target v:

    L = || V - v ||^2,     V = (z_t - x_theta)/t + (t - r) * sg(du/dt)

(the same gradient as eq. 9-10: only u carries it). One-step generation is then x = unet(eps, t=1, r=0).
Each sample's squared error (a mean over its elements, so the constant does not depend on the
resolution) is divided by sg(loss + 0.01): MeanFlow's adaptive loss weighting w = 1 / sg(||d||^2 + c)^p
with p = 1 (its "loss metrics" design choice), with pMF's c.

At t = 1 the residual does not see the x-prediction's value: z_1 = eps, u = eps - x_theta and
du/dt = v - dx_theta/dt - u, so V - v = -dx_theta/dt. A row at (t, r) = (1, 0) only asks x_theta to stop
moving in t, and any output constant in t, the zero-initialised network's included, scores 0 there.
`boundary_rows` gives such rows the r = t target instead (V = u, so ||V - v||^2 = ||x_theta - x||^2 at
t = 1: the conditional mean, the flow-matching boundary), while the network still sees their (t, r).

The JVP: our ops (torch.ops.musetalk_fast) have backward rules, not forward-mode ones, so
torch.func.jvp cannot go through them. `finite_difference_jvp` takes a central difference instead,
along the same tangent (dz, dt, dr) = (v, 1, 0):

    dx/dt ~ [x(z + h v, t + h, r) - x(z - h v, t - h, r)] / (2 h)

(one-sided three-point differences where t +- h would leave the network's domain 0 <= r <= t <= 1)

and du/dt follows from the quotient rule on u = (z - x)/t: du/dt = (v - dx/dt - u) / t. Differencing
x (O(1) values, no 1/t inside) rather than u keeps the cancellation small.

The step h: a central difference errs by truncation, h^2/6 |x'''|, plus rounding, eps |x| / h. The
fastest thing in x along this tangent is the U-Net's time embedding, sin/cos(1000 t f) with f <= 1
(model/embeddings.py's TIME_SCALE), so truncation goes as (1000 h)^2 / 6 relative; rounding is
float32's whatever the input dtype (the time embedding and the rotary frame positions compute in
float32), ~1.2e-7 / h relative. Both are ~1e-3 at h = 1e-4: DEFAULT_STEP. Measured on the
random-weight tiny U-Net (reference ops, torch.func.jvp in float64 as the truth), max error / max
|JVP| of the float32 difference: 1.3e-3 at h = 1e-4; 1.1e-2 at 3e-4 (truncation); 1.7e-3 at 3e-5 and
4.5e-3 at 1e-5 (rounding); float64 weights give the same 1.3e-3 at 1e-4 (the float32 embedding). The
one-sided stencils have larger constants: 3.2e-3 (backward, at t = 1) and 2.3e-3 (forward). A network
without a fast time embedding (the tests' small MLP in float64) reaches 1e-7
with a smaller step. The two extra forwards run without autograd and in float32 at least, autocast
off (two bf16 outputs 1e-4 apart would differ by rounding alone), so they cost two forward passes
and no activation memory. Rows with r = t skip them: their JVP is multiplied by t - r = 0.
tests/train/test_meanflow.py checks all this against torch.func.jvp, on a small network and on the
U-Net with reference ops.
"""
import contextlib

import torch
from torch.nn import functional

ADAPTIVE_WEIGHT_C = 0.01  # pMF's c in loss / sg(loss + c)


def sample_times(batch, generator=None, mean=-0.4, std=1.0, equal_share=0.75, device=None, dtype=torch.float32):
    """(t, r) of `batch` samples, 0 < r <= t < 1: two logit-normal draws (sigmoid of N(mean, std^2)),
    t the larger, r the smaller; a share `equal_share` of the rows gets r = t (plain flow matching).
    MeanFlow's best ImageNet setting (its Table 1) is lognorm(-0.4, 1.0) with 25 % of rows r != t."""
    if not 0 <= equal_share <= 1:
        raise ValueError(f"equal_share must be in [0, 1] (got {equal_share})")
    if not std > 0:
        raise ValueError(f"std must be positive (got {std})")
    draws = torch.sigmoid(torch.randn(2, batch, generator=generator, dtype=torch.float64) * std + mean)
    t, r = draws.max(0).values, draws.min(0).values
    equal = torch.rand(batch, generator=generator, dtype=torch.float64) < equal_share
    r = torch.where(equal, t, r)
    return t.to(device=device, dtype=dtype), r.to(device=device, dtype=dtype)


DEFAULT_STEP = 1e-4  # the central difference's step in t (z moves by step * v): see the module docstring


def _rows(t, r):
    return (t - r) > 0


# Three-point stencils of dx/dt: (offsets in steps, weights / h). The network takes only 0 <= r <= t <= 1,
# so rows within a step of t = 1 (one-step rows at t = 1, unless boundary rows) use the backward one, rows within a step
# of t = r the forward one; all are exact for quadratics (error O(h^2) like the central difference).
CENTRAL = ((-1.0, 1.0, 0.0), (-0.5, 0.5, 0.0))
BACKWARD = ((0.0, -1.0, -2.0), (1.5, -2.0, 0.5))
FORWARD = ((0.0, 1.0, 2.0), (-1.5, 2.0, -0.5))


def finite_difference_jvp(predict_x, z, v, t, r, step=None):
    """dx/dt of x = predict_x(z, t, r, rows) along the tangent (dz, dt, dr) = (v, 1, 0) by finite
    differences with step `step` (default DEFAULT_STEP), evaluated in float32 at least, autocast off:
    the central difference where t +- h stays in [r, 1], else a one-sided three-point one (BACKWARD
    near t = 1, FORWARD near t = r; a third forward pass for those rows only). Rows with t - r < 2h
    that are also within 2h of t = 1 fit no stencil and get 0 (their JVP is multiplied by t - r < 2h).
    Only rows with t > r are evaluated (others get zeros); `predict_x` receives those rows' index
    tensor as `rows` to select its conditioning. No autograd graph is built."""
    h = DEFAULT_STEP if step is None else float(step)
    central = (t - h >= r) & (t + h <= 1)
    backward = ~central & (t - 2 * h >= r)
    forward = ~central & ~backward & (t + 2 * h <= 1) & (t > r)
    out = torch.zeros_like(z)
    work = torch.promote_types(z.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        for where, (offsets, weights) in ((central, CENTRAL), (backward, BACKWARD), (forward, FORWARD)):
            rows = where.nonzero().flatten()
            if rows.numel() == 0:
                continue
            zs, vs, ts, rs = z[rows].to(work), v[rows].to(work), t[rows].to(work), r[rows].to(work)
            total = 0
            for offset, weight in zip(offsets, weights):
                if weight:
                    at = offset * h
                    total = total + weight * predict_x(zs + at * vs, ts + at, rs, rows).to(work)
            out[rows] = (total / h).to(z.dtype)
    return out


@contextlib.contextmanager
def _contiguous_group_norm():
    """torch's forward-mode rule of group_norm views its input and fails on a non-contiguous one (the
    mHC streams' layout): give it a contiguous copy while a forward-mode JVP runs."""
    original = functional.group_norm

    def group_norm(input, *args, **kwargs):
        return original(input.contiguous(), *args, **kwargs)

    functional.group_norm = group_norm
    try:
        yield
    finally:
        functional.group_norm = original


def forward_mode_jvp(predict_x, z, v, t, r):
    """dx/dt along (v, 1, 0) with torch.func.jvp: exact, for models whose ops all have forward-mode
    rules (e.g. the U-Net under musetalk_fast.ops.use_reference_ops()). The reference for the tests."""
    rows = _rows(t, r).nonzero().flatten()
    out = torch.zeros_like(z)
    if rows.numel() == 0:
        return out
    zs, vs, ts, rs = z[rows], v[rows], t[rows], r[rows]
    with torch.no_grad(), _contiguous_group_norm():
        _, tangent = torch.func.jvp(lambda zz, tt: predict_x(zz, tt, rs, rows), (zs, ts), (vs, torch.ones_like(ts)))
    out[rows] = tangent
    return out


def pmf_loss(predict_x, x, eps, t, r, jvp="finite_difference", step=None, adaptive=True, boundary_rows=None):
    """The pMF loss of a batch (module docstring). predict_x(z, t, r, rows=None) -> x_pred is the
    network with its conditioning bound (rows: None for the whole batch, else an index tensor of the
    rows it is called on). x, eps: [B, ...] clean target and noise; t, r: [B].
    boundary_rows (optional bool [B]): rows whose network still sees their (t, r) but whose loss drops the
    JVP term, V = u (the r = t target): ||x_pred - x||^2 / t^2. The trainer's one-step rows at (1, 0)
    use it: there the pMF residual V - v = -dx/dt does not depend on x_pred's value (module docstring).

    Returns a dict: `loss` (the scalar to minimise: mean over the batch of the adaptively weighted
    per-sample losses), `mse` (the unweighted per-sample ||V - v||^2 means, detached), `x_pred` (the
    network's x-prediction at (z_t, t, r), with its graph, for image-space losses), `z_t`, `dudt`."""
    if jvp not in ("finite_difference", "forward_mode"):
        raise ValueError(f"jvp must be 'finite_difference' or 'forward_mode' (got {jvp!r})")
    if x.shape != eps.shape or t.shape != (x.shape[0],) or r.shape != t.shape:
        raise ValueError(f"x and eps must have one shape [B, ...] and t, r the shape [B] "
                         f"(got x {tuple(x.shape)}, eps {tuple(eps.shape)}, t {tuple(t.shape)}, r {tuple(r.shape)})")
    if bool((r > t).any()) or bool((t <= 0).any()):
        raise ValueError("times must satisfy 0 < t and r <= t")
    if boundary_rows is not None:
        if boundary_rows.shape != t.shape or boundary_rows.dtype != torch.bool:
            raise ValueError(f"boundary_rows must be a bool tensor of shape [B] = {tuple(t.shape)} "
                             f"(got {boundary_rows.dtype} {tuple(boundary_rows.shape)})")
        r_loss = torch.where(boundary_rows.to(t.device), t, r)  # the JVP term's factor t - r becomes 0
    else:
        r_loss = r
    shape = (-1,) + (1,) * (x.dim() - 1)
    tb = t.view(shape)
    z_t = (1 - tb) * x + tb * eps  # MeanFlow eq. 1
    v = eps - x                    # the conditional velocity dz_t/dt
    x_pred = predict_x(z_t, t, r, None)
    u = (z_t - x_pred.to(z_t.dtype)) / tb  # pMF: the average velocity of the x-prediction
    # the JVP runs only on rows with r_loss < t (boundary rows skip it; elsewhere r_loss = r)
    if jvp == "finite_difference":
        dxdt = finite_difference_jvp(predict_x, z_t, v, t, r_loss, step)
    else:
        dxdt = forward_mode_jvp(predict_x, z_t, v, t, r_loss)
    # du/dt of u = (z - x)/t along (v, 1, 0): (dz/dt - dx/dt)/t - (z - x)/t^2 = (v - dx/dt - u)/t
    dudt = ((v - dxdt - u.detach()) / tb).detach()
    big_v = u + (tb - r_loss.view(shape)) * dudt  # V = u + (t - r) sg(du/dt): the MeanFlow identity, eq. 6
    mse = (big_v - v).pow(2).flatten(1).mean(1)
    weighted = mse / (mse.detach() + ADAPTIVE_WEIGHT_C) if adaptive else mse
    return {"loss": weighted.mean(), "mse": mse.detach(), "x_pred": x_pred, "z_t": z_t, "dudt": dudt}


def one_step(predict_x, eps):
    """One-step generation: x = network(eps, t=1, r=0) (u = eps - x, z_0 = z_1 - 1 * u)."""
    ones = torch.ones(eps.shape[0], dtype=eps.dtype, device=eps.device)
    return predict_x(eps, ones, torch.zeros_like(ones), None)


__all__ = ["ADAPTIVE_WEIGHT_C", "DEFAULT_STEP", "finite_difference_jvp", "forward_mode_jvp", "one_step", "pmf_loss",
           "sample_times"]
