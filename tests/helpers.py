"""Shared test machinery: which backends run here, and the dtype-aware closeness rule."""
import os

import torch

TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


# Devices the ops run on here: what gradcheck, opcheck, torch.compile and the bad-input tests cover.
DEVICES = ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


def kernel_backends():
    """Where the kernels run in this session: the CPU C++ kernels always; the Triton kernels on the
    GPU, or on CPU tensors under the interpreter."""
    backends = ["cpu"]
    if HAS_CUDA:
        backends.append("cuda")
    elif TRITON_INTERPRETED:
        backends.append("triton-interpreter")
    return backends


def backend_device(backend):
    return "cuda" if backend == "cuda" else "cpu"


def float_arguments_as_on_a_gpu(kernel):
    """kernel[grid](...) with every Python float argument rounded to float32 first: what a GPU launch does
    (Triton types a float argument fp32, below; the interpreter keeps the float64 value)."""
    from triton.runtime.jit import mangle_type

    assert mangle_type(0.1) == "fp32", "the premise: Triton's launcher passes a Python float as float32"

    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args = [torch.tensor(a, dtype=torch.float32).item() if isinstance(a, float) else a for a in args]
                return kernel[grid](*args, **kwargs)
            return launch

    return Launcher()


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def assert_close_to_reference(got, exact, same_math_at_dtype=None, name="output", atol=None, rtol=None,
                              extra_allowance=0.0):
    """FlashAttention's rule for low precision: the kernel's error against the float64 reference is at
    most twice the error of the same math done by PyTorch at the kernel's dtype (plus a hair).
    float32/float64 kernels are compared directly against the reference. `extra_allowance` is an
    error the op's design adds on purpose (measured by the caller, never guessed)."""
    got, exact = got.detach().double().cpu(), exact.detach().double().cpu()
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    if same_math_at_dtype is None:
        torch.testing.assert_close(got, exact, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        return
    lowp = same_math_at_dtype.detach().double().cpu()
    error = (got - exact).abs().max().item() if got.numel() else 0.0
    baseline = (lowp - exact).abs().max().item() if got.numel() else 0.0
    scale = exact.abs().max().item() if got.numel() else 0.0
    # The hair: about one bfloat16 ulp at the reference's magnitude (rounding of saved low-precision
    # tensors, e.g. the output the backward reads, can make an exactly-zero gradient ~1e-3).
    assert error <= 2 * baseline + 2 * extra_allowance + 1e-2 * max(scale, 1.0), (
        f"{name}: max error {error:.3e} vs PyTorch-at-dtype error {baseline:.3e} (reference max {scale:.3e})"
    )


def save_random_vgg16(path):
    """A torchvision vgg16 "features" state dict with random weights, as a .safetensors file at `path`
    (what VGGPerceptual / --perceptual-vgg read; the real weights are never downloaded in the tests)."""
    from safetensors.torch import save_file

    layers, channels = [], 3
    for item in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if item == "M":
            layers.append(torch.nn.MaxPool2d(2))
        else:
            layers += [torch.nn.Conv2d(channels, item, 3, padding=1), torch.nn.ReLU()]
            channels = item
    save_file({f"features.{k}": v for k, v in torch.nn.Sequential(*layers).state_dict().items()}, str(path))
