"""Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; it must be switched
on before triton is first imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests check correctness over many shapes: launch configs come from the shipped tables and
# heuristics (kernels/tuning.py), never from timing every config at every new shape.
os.environ["MUSETALK_FAST_AUTOTUNE"] = "0"


def _fix_interpreter_bfloat16_dot():
    """Triton 3.6's interpreter keeps bfloat16 as uint16 bits and its tl.dot multiplies those bits
    as integers (it converts fp8 operands, not bf16). Widen bf16 operands to float32 first, as the
    GPU's tensor cores do (exact products, fp32 accumulation). Test harness only: GPU code is untouched."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)

        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime import interpreter as _interpreter

    if hasattr(_interpreter, "InterpreterBuilder") and hasattr(_interpreter, "_convert_float"):
        _fix_interpreter_bfloat16_dot()
