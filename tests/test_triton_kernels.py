"""The Triton LoRA kernels against float64 references on the same masks: on CUDA when there is a GPU, and on
the CPU under Triton's interpreter (a subprocess with TRITON_INTERPRET=1, which Triton reads at import)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from lorafit.kernels import mask, triton_kernels  # noqa: E402

# bf16 only on a GPU: the interpreter's bf16 dot products and roundings are not the compiled kernels'
INTERPRETED_DTYPES = (torch.float32, torch.float16)


def check_products(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    t, _ = mask.threshold(0.3)
    # odd sizes for the tiles' edges, one column, r below, at and past a tile of 16, strided rows
    for m, k, r in [(37, 19, 3), (70, 130, 16), (5, 1, 8), (200, 64, 20), (300, 257, 64)]:
        x = torch.randn(m, k + 3, dtype=dtype, device=device)[:, 1:-2]
        a = torch.randn(r, k, dtype=dtype, device=device)
        g = torch.randn(m, r, dtype=dtype, device=device)
        key = mask.new_key(x.device)
        keep = mask.keep_mask(m, k, key, t)
        tol = dict(rtol=1e-4, atol=1e-4 * k ** 0.5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * k ** 0.5)
        for masked in (False, True):
            kk = key if masked else None
            kp = keep if masked else torch.ones_like(keep)
            xd = torch.where(kp, x, 0).double()
            torch.testing.assert_close(triton_kernels.down(x, a, kk, t).double(), xd @ a.double().T, **tol)
            torch.testing.assert_close(triton_kernels.grad_a(g, x, kk, t, 0.5).double(), 0.5 * g.double().T @ xd,
                                       **dict(tol, atol=tol["atol"] * (m / k) ** 0.5))
            want = 0.7 * torch.where(kp, g.double() @ a.double(), 0)
            torch.testing.assert_close(triton_kernels.up(g, a, 0.7, None, None, kk, t).double(), want, **tol)
            out = torch.randn(m, k, dtype=dtype, device=device)
            before = out.double()
            got = triton_kernels.up(g, a, 0.7, out, None, kk, t)
            assert got.data_ptr() == out.data_ptr()
            torch.testing.assert_close(got.double(), before + want, **tol)
        # both of a masked adapter's backward products in one kernel, into a new tensor and into out
        key = mask.new_key(x.device)
        kp = mask.keep_mask(m, k, key, t)
        xd = torch.where(kp, x, 0).double()
        want_a = 0.5 * g.double().T @ xd
        want_up = 0.7 * torch.where(kp, g.double() @ a.double(), 0)
        ga, up = triton_kernels.grad_a_and_up(g, x, a, key, t, 0.5, 0.7)
        torch.testing.assert_close(ga.double(), want_a, **dict(tol, atol=tol["atol"] * (m / k) ** 0.5))
        torch.testing.assert_close(up.double(), want_up, **tol)
        out = torch.randn(m, k, dtype=dtype, device=device)
        before = out.double()
        ga, up = triton_kernels.grad_a_and_up(g, x, a, key, t, 0.5, 0.7, out)
        assert up.data_ptr() == out.data_ptr()
        torch.testing.assert_close(ga.double(), want_a, **dict(tol, atol=tol["atol"] * (m / k) ** 0.5))
        torch.testing.assert_close(up.double(), before + want_up, **tol)


def check_mask_scale(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    t, scale = mask.threshold(0.1)
    for m, k in [(37, 19), (3, 1000), (64, 384)]:
        x = torch.randn(m, k + 5, dtype=dtype, device=device)[:, 2:-3]
        key = mask.new_key(x.device)
        want = torch.where(mask.keep_mask(m, k, key, t), x.float() * scale, 0).to(dtype)
        assert torch.equal(triton_kernels.mask_scale(x, key, t, scale), want)


def check_dequantize(device: str, dtype: torch.dtype) -> None:
    """QLoRA's dequantization: NF4 and int8 codes to level * scale, rounded once, bit for bit the formula."""
    from lorafit.kernels.dequantize import nf4_levels

    torch.manual_seed(2)
    levels = nf4_levels(torch.device(device))
    # sizes that are not a multiple of a program's 1024 codes, blocks of 32 and 64
    for rows, cols, block in [(3, 64, 64), (37, 128, 32), (130, 512, 64)]:
        n = rows * cols
        absmax = torch.rand(n // block, device=device) + 0.1
        packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, device=device)
        codes = torch.stack((packed >> 4, packed & 15), -1).flatten().long()
        want = (levels[codes].view(-1, block) * absmax[:, None]).view(rows, cols).to(dtype)
        assert torch.equal(triton_kernels.dequantize(packed, absmax, levels, block, (rows, cols), dtype), want)
        int8 = torch.randint(-127, 128, (n,), dtype=torch.int8, device=device)
        scales = absmax / 127
        want = (int8.view(-1, block).float() * scales[:, None]).view(rows, cols).to(dtype)
        assert torch.equal(triton_kernels.dequantize(int8, scales, None, block, (rows, cols), dtype), want)


def check_lora_linear(device: str) -> None:
    """The whole accelerator path of the LoRA linear (forward and every gradient, with and without a bias, two
    adapters with dropout) with its masked products in these kernels, against the float64 formula."""
    from unittest import mock

    from torch import nn

    from lorafit.kernels import cpu, linear
    from tests.test_fused_linear import _compare, _layer

    launched = {name: mock.Mock(wraps=getattr(triton_kernels, name)) for name in ("down", "grad_a_and_up", "up")}
    with (mock.patch.object(linear, "cpu_path", lambda x: False), mock.patch.object(cpu, "serves", lambda x: False),
          mock.patch.multiple(triton_kernels, **launched)):
        for bias in (True, False):
            model = _layer(nn.Linear(16, 24, bias=bias), [("a", 4), ("b", 2)], torch.float32, 0.3).to(device)
            _compare(model, torch.randn(8, 5, 16, device=device), 0.3, torch.float32)
        model.zero_grad()
        model[0].lora_A["a"].requires_grad_(False)  # a frozen A: dx's part alone (up), next to a trained adapter
        _compare(model, torch.randn(8, 5, 16, device=device), 0.3, torch.float32)
    assert all(fn.called for fn in launched.values()), {name: fn.call_count for name, fn in launched.items()}


@pytest.mark.cuda
def test_lora_linear_with_triton_masks_on_cuda():
    check_lora_linear("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernels_on_cuda(dtype):
    check_products("cuda", dtype)
    check_mask_scale("cuda", dtype)
    check_dequantize("cuda", dtype)


def _compiled_variants(kernel) -> int:
    """How many compiled versions of a Triton kernel this process holds (Triton keeps them per device)."""
    caches = getattr(kernel, "device_caches", None)
    if isinstance(caches, dict) and caches:
        return sum(len(entry[0]) for entry in caches.values())
    if isinstance(getattr(kernel, "cache", None), dict):
        return sum(len(per_device) for per_device in kernel.cache.values())
    pytest.skip("this Triton version keeps its compiled kernels where the test does not look")


@pytest.mark.cuda
def test_new_row_counts_compile_nothing_new():
    """Row counts are not specialised on: batches of other lengths reuse the kernels compiled for the first."""
    from lorafit.kernels import triton_jit

    t, _ = mask.threshold(0.1)
    a = torch.randn(16, 256, dtype=torch.bfloat16, device="cuda")
    key = mask.new_key(torch.device("cuda"))
    kernel = triton_jit._down_kernel
    triton_kernels.down(torch.randn(64, 256, dtype=torch.bfloat16, device="cuda"), a, key, t)
    before = _compiled_variants(kernel)
    for rows in (37, 1, 1000, 4099):
        triton_kernels.down(torch.randn(rows, 256, dtype=torch.bfloat16, device="cuda"), a, key, t)
    assert _compiled_variants(kernel) == before


@pytest.mark.cuda
def test_triton_masks_past_2_to_the_31_elements_equal_the_reference():
    """Positions are row * cols + col mod 2^32 whatever the size: the rows past 2^31 elements of a bf16
    tensor get the reference's mask (compared on the last rows, as the whole reference would not fit)."""
    rows, cols = (1 << 31) // 4096 + 3, 4096
    x = torch.ones(rows, cols, dtype=torch.bfloat16, device="cuda")
    key = torch.tensor(12345, dtype=torch.int32, device="cuda")
    t, _ = mask.threshold(0.5)
    kept = triton_kernels.mask_scale(x, key, t) != 0
    tail = mask.keep_mask(8, cols, key, t, first_row=rows - 8)
    assert torch.equal(kept[-8:], tail)
    del x, kept


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_launches_of_compiled_kernels_compute_what_jit_launches_do(dtype, monkeypatch):
    """The first launch of each variant goes through Triton's JIT, later ones call its compiled kernel directly:
    both checked against the float64 references."""
    monkeypatch.setattr(triton_kernels, "_compiled", {})
    check_products("cuda", dtype)
    launched = dict(triton_kernels._compiled)
    assert launched and triton_kernels._direct
    check_products("cuda", dtype)  # the same variants: direct launches
    assert triton_kernels._direct and triton_kernels._compiled == launched  # none failed, none new


class _FakeCompiled:
    """What a compiled Triton kernel looks like to _launch: kernel[grid](*every parameter in order)."""

    packed_metadata = None

    def __init__(self, calls: list, fail: bool = False):
        self.calls, self.fail = calls, fail

    def __getitem__(self, grid):
        def runner(*args):
            if self.fail:
                raise TypeError("function takes exactly 14 arguments (16 given)")
            self.calls.append(("direct", grid, args))
        return runner


class _FakeJit:
    """A JIT kernel with parameters (x_ptr, n, BM, BK): each launch returns its compiled kernel."""

    arg_names = ["x_ptr", "n", "BM", "BK"]

    def __init__(self, calls: list, compiled_fails: bool = False):
        self.calls, self.compiled_fails = calls, compiled_fails

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            self.calls.append(("jit", grid, args + tuple(constexprs.values())))
            return _FakeCompiled(self.calls, self.compiled_fails)
        return launch


def _launches(monkeypatch, x: torch.Tensor, times: int, compiled_fails: bool = False) -> list:
    import types

    import lorafit.kernels

    calls: list = []
    stand_in = types.SimpleNamespace(_fake_kernel=_FakeJit(calls, compiled_fails))
    monkeypatch.setitem(sys.modules, "lorafit.kernels.triton_jit", stand_in)
    monkeypatch.setattr(lorafit.kernels, "triton_jit", stand_in, raising=False)  # if an earlier test imported it
    monkeypatch.setattr(triton_kernels, "_compiled", {})
    monkeypatch.setattr(triton_kernels, "_direct", True)
    for _ in range(times):
        triton_kernels._launch("_fake_kernel", (4,), (x, 64), dict(BM=16, BK=32), wait=True)
    return calls


def test_a_variant_launched_before_is_launched_through_its_compiled_kernel(monkeypatch):
    x = torch.zeros(64)
    calls = _launches(monkeypatch, x, 3)
    assert [(how, grid) for how, grid, _ in calls] == [("jit", (4,)), ("direct", (4, 1, 1)), ("direct", (4, 1, 1))]
    for _, _, args in calls:  # every parameter in the kernel's order, constexprs last
        assert args[0] is x and args[1:] == (64, 16, 32)
    unaligned = torch.zeros(65)[1:]  # not what Triton specialised on: through the JIT every time
    assert [how for how, _, _ in _launches(monkeypatch, unaligned, 2)] == ["jit", "jit"]


def test_a_direct_launch_that_fails_hands_every_launch_back_to_the_jit(monkeypatch):
    with pytest.warns(UserWarning, match="launch through Triton's JIT launcher.*14 arguments"):
        calls = _launches(monkeypatch, torch.zeros(64), 3, compiled_fails=True)
    assert [how for how, _, _ in calls] == ["jit", "jit", "jit"]  # the failed call relaunched, then no more tries
    assert not triton_kernels._direct and not triton_kernels._compiled


def test_a_kernel_that_fails_warns_once_and_the_torch_ops_take_over(monkeypatch):
    monkeypatch.setattr(triton_kernels, "_unavailable", None)
    triton_kernels._warn_once.cache_clear()

    def broken(*args, **kwargs):
        raise RuntimeError("PTX for sm_1000 unsupported")

    with pytest.warns(UserWarning, match="Triton kernels are unavailable.*sm_1000.*plain torch ops"):
        assert triton_kernels.run(broken, 1) is None
    assert not triton_kernels.available(torch.device("cuda"))  # from now on, the torch ops
    triton_kernels._warn_once.cache_clear()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already interpreted")
def test_triton_kernels_under_the_interpreter():
    root = Path(__file__).parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(root / "src"), str(root)]))
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "interpreted checks passed" in done.stdout


if __name__ == "__main__":
    assert triton_kernels.available(torch.device("cpu")), "run with TRITON_INTERPRET=1"
    for dtype in INTERPRETED_DTYPES:
        check_products("cpu", dtype)
        check_mask_scale("cpu", dtype)
        check_dequantize("cpu", dtype)
    check_lora_linear("cpu")
    print("interpreted checks passed")
