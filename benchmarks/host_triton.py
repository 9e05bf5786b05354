"""Host time of an adapted layer with dropout, Triton's launch path included, on a machine without a GPU.

    python -m benchmarks.host_triton [--calls N] [--reps R]     (prints one JSON line of medians, µs a call)

On a GPU a masked layer's forward and backward each launch a Triton kernel; what the host spends on them is
lorafit's launcher and Triton's dispatch (binding, specialisation, the cache lookup). Here Triton's own driver
is replaced by a stand-in for an sm_90 GPU: the kernels really compile (Triton's compiler needs no GPU), and
only the launch itself (loading the module, cuLaunchKernel) is a no-op. The tensors are tiny CPU tensors, so
what is timed is Python, autograd and the launch path, as in ``--only host``. Variants, interleaved: the base
layer alone, lorafit without and with dropout (with dropout: direct launches of the compiled kernels, and every
launch through Triton's JIT), and PEFT's formula with dropout. A process of its own: the stand-in driver is
global to Triton.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from torch import nn


def _stand_in_driver() -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compiler
    from triton.runtime import driver

    class StandIn:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_device_capability(self, device=0):
            return 9, 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    def no_module(kernel) -> None:  # what loading the cubin on a GPU would set; the launch does nothing
        if kernel.module is None:
            kernel.module, kernel.function, kernel.n_regs, kernel.n_spills, kernel.n_max_threads = 1, 0, 0, 0, 1024
            kernel._run = lambda *args: None

    driver.set_active(StandIn())
    compiler.CompiledKernel._init_handles = no_module


def measure(calls: int, reps: int) -> dict[str, float]:
    """Medians in µs a call; the stand-in driver must be in place (_stand_in_driver)."""
    os.environ["LORAFIT_TRITON_WARMUP"] = "0"  # compile here, first call
    import lorafit
    from benchmarks.kernels_gpu import _PeftStyle
    from benchmarks.timing import interleaved, median
    from lorafit.kernels import cpu, linear, triton_kernels

    # the accelerator implementation on CPU tensors, with the Triton kernels for the masked products
    linear.cpu_path = cpu.serves = lambda x: False
    triton_kernels.available = lambda device: True
    torch.manual_seed(0)
    base = nn.Linear(16, 16, bias=False).requires_grad_(False)
    x, g = torch.randn(8, 16), torch.randn(8, 16)

    def adapted(p: float) -> nn.Module:
        model = nn.Sequential(copy.deepcopy(base))
        lorafit.attach(model, lorafit.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["0"]))
        return model[0].train()

    def calling(module, direct: bool = True):
        def run() -> None:
            triton_kernels._direct = direct
            for _ in range(calls):
                module(x.detach().requires_grad_(True)).backward(g)
        return run

    masked = adapted(0.05)
    steps = {"floor (base layer alone)": calling(base), "lorafit, dropout 0": calling(adapted(0.0)),
             "lorafit, dropout 0.05": calling(masked),
             "lorafit, dropout 0.05, every launch through Triton's JIT": calling(masked, direct=False),
             "PEFT's formula, dropout 0.05": calling(_PeftStyle(base, 4, 0.05).train())}
    times = interleaved(steps, reps=reps, warmup=1)
    return {key: 1e6 * median(ts) / calls for key, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    start = time.perf_counter()
    try:
        _stand_in_driver()
    except (ImportError, AttributeError, TypeError) as err:  # another Triton's internals: nothing to time here
        reason = f"this Triton's launch path cannot be stood in for ({type(err).__name__}: {err})"
        print(json.dumps({"skipped": reason}))
        return
    result = measure(args.calls, args.reps)
    print(json.dumps({"median_us": result, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
