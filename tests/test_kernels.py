"""Every kernel backend equals the loop; blocksparse topology; megablocks adapter; errors."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

import kernels
from kernels import blocksparse, megablocks
from kernels.loop import loop_mm

SIZE_CASES = {
    "mixed_with_empty": [5, 0, 7, 0, 3],
    "all_in_one_group": [0, 0, 12, 0],
    "single_group": [9],
    "no_rows": [0, 0, 0],
    "random": None,  # filled below: 6 groups, some empty
}


def sizes_for(case: str) -> torch.Tensor:
    if SIZE_CASES[case] is not None:
        return torch.tensor(SIZE_CASES[case])
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 9, (6,), generator=gen)
    sizes[torch.tensor([1, 4])] = 0
    return sizes


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(blocksparse, "BLOCK_SIZE", 4)
    monkeypatch.setattr(blocksparse, "CHUNK_ELEMENTS", 64)  # several chunks even on tiny shapes


def make_inputs(sizes, d_in, d_out, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(int(sizes.sum()), d_in, generator=gen, dtype=dtype).requires_grad_()
    w = torch.randn(len(sizes), d_in, d_out, generator=gen, dtype=dtype).requires_grad_()
    return x, w


def run(fn, x, w, sizes, seed=1):
    x.grad = w.grad = None
    y = fn(x, w, sizes)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(SIZE_CASES))
@pytest.mark.parametrize("backend", [b for b in kernels.BACKENDS if b != "auto"])
def test_backend_equals_loop(backend, case, dtype):
    if backend not in kernels.available_backends("cpu", dtype):
        pytest.skip(f"{backend} unavailable on cpu/{dtype}")
    sizes = sizes_for(case)
    x, w = make_inputs(sizes, d_in=12, d_out=8, dtype=dtype)
    y, dx, dw = run(lambda a, b, s: kernels.grouped_mm(a, b, s, backend=backend), x, w, sizes)
    y_ref, dx_ref, dw_ref = run(loop_mm, x, w, sizes)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert y.shape == (int(sizes.sum()), 8)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    torch.testing.assert_close(dw, dw_ref, **tol)


@pytest.mark.parametrize("backend", [b for b in kernels.BACKENDS if b != "auto"])
def test_non_contiguous_incoming_gradient(backend):
    """`.sum()` sends an expanded (stride 0) gradient, a transpose a strided one."""
    if backend not in kernels.available_backends("cpu", torch.float32):
        pytest.skip(f"{backend} unavailable on cpu")
    sizes = torch.tensor([3, 0, 5])
    x, w = make_inputs(sizes, 8, 8, torch.float32)
    kernels.grouped_mm(x, w, sizes, backend).sum().backward()
    torch.testing.assert_close(w.grad[0], x[:3].detach().sum(0)[:, None].expand(8, 8))
    dy_ON = torch.randn(8, 8)
    x.grad = w.grad = None
    kernels.grouped_mm(x, w, sizes, backend).backward(dy_ON.t())
    dx, dw = x.grad, w.grad
    x.grad = w.grad = None
    loop_mm(x, w, sizes).backward(dy_ON.t().contiguous())
    torch.testing.assert_close(dx, x.grad)
    torch.testing.assert_close(dw, w.grad)


def test_loop_matches_explicit_slices():
    sizes = torch.tensor([2, 0, 3])
    x, w = make_inputs(sizes, 4, 4, torch.float64)
    y = loop_mm(x, w, sizes)
    torch.testing.assert_close(y, torch.cat([x[:2] @ w[0], x[2:] @ w[2]]))


def test_group_sizes_on_other_device_and_dtype():
    """int32 sizes work everywhere (the MoE layer may hand either int type)."""
    sizes = torch.tensor([3, 0, 5], dtype=torch.int32)
    x, w = make_inputs(sizes, 8, 8, torch.float32)
    for backend in kernels.available_backends("cpu", torch.float32):
        torch.testing.assert_close(kernels.grouped_mm(x, w, sizes, backend), loop_mm(x, w, sizes.long()))


@pytest.mark.parametrize("backend", ["loop", "padded", "blocksparse", "grouped"])
def test_gradcheck_fp64(backend):
    if backend not in kernels.available_backends("cpu", torch.float64):
        pytest.skip(f"{backend} has no float64 on cpu")
    sizes = torch.tensor([3, 0, 2])
    x, w = make_inputs(sizes, 3, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: kernels.grouped_mm(a, b, sizes, backend), (x, w))


def test_blocksparse_partial_block_size_and_odd_widths():
    """block_size as an argument (functools.partial-able); d_in need not be a block multiple."""
    import functools
    sizes = torch.tensor([1, 6, 0, 4])
    x, w = make_inputs(sizes, 5, 6, torch.float64)
    fn = functools.partial(blocksparse.blocksparse_mm, block_size=3)
    for got, want in zip(run(fn, x, w, sizes), run(loop_mm, x, w, sizes)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("sizes,block,d_out", [([5, 0, 3], 4, 8), ([0, 0, 0], 4, 8), ([9], 2, 6),
                                               ([4, 4], 4, 4), ([7, 1, 0, 13], 4, 12)])
def test_topology_invariants(sizes, block, d_out):
    sizes = torch.tensor(sizes)
    topo = blocksparse.build_topology(sizes, block, d_out)
    per_row = d_out // block
    padded = (sizes + block - 1) // block * block
    assert topo.padded_bins_G.tolist() == torch.cumsum(padded, 0).tolist()
    num_blocks = int(((sizes + block - 1) // block).sum()) * per_row
    assert topo.row_indices_K.numel() == topo.column_indices_K.numel() == num_blocks
    assert topo.shape == (int(padded.sum()), len(sizes) * d_out)
    # CSR: row r's blocks are offsets[r]:offsets[r+1], all columns of the group owning row r.
    group_of_row = torch.repeat_interleave(torch.arange(len(sizes)), padded // block)
    for r in range(topo.offsets_R1.numel() - 1):
        lo, hi = int(topo.offsets_R1[r]), int(topo.offsets_R1[r + 1])
        assert (topo.row_indices_K[lo:hi] == r).all()
        assert (topo.column_indices_K[lo:hi] // per_row == group_of_row[r]).all()
    # The transpose lists the same nonzeros, column by column.
    pairs = set(zip(topo.row_indices_K.tolist(), topo.column_indices_K.tolist()))
    pairs_t = set()
    for c in range(topo.offsets_t_C1.numel() - 1):
        lo, hi = int(topo.offsets_t_C1[c]), int(topo.offsets_t_C1[c + 1])
        for row, k in zip(topo.column_indices_t_K[lo:hi].tolist(), topo.block_offsets_t_K[lo:hi].tolist()):
            assert int(topo.row_indices_K[k]) == row and int(topo.column_indices_K[k]) == c
            pairs_t.add((row, c))
    assert pairs_t == pairs and len(topo.block_offsets_t_K.unique()) == num_blocks
    # Gather map: real rows land inside their group's padded range, in order.
    starts = torch.cumsum(padded, 0) - padded
    expected = torch.cat([starts[g] + torch.arange(int(n)) for g, n in enumerate(sizes)])
    assert topo.row_map_N.tolist() == expected.tolist()


def test_blocksparse_rejects_d_out_not_multiple_of_block():
    sizes = torch.tensor([2, 2])
    x, w = make_inputs(sizes, 4, 6, torch.float32)
    with pytest.raises(ValueError, match="block_size"):
        kernels.grouped_mm(x, w, sizes, "blocksparse")


# --- megablocks adapter, exercised on CPU through a fake grouped_gemm -------------------------

def fake_grouped_gemm(monkeypatch):
    calls = []

    def gmm(a, b, batch_sizes, trans_b=False):
        calls.append((a, b, batch_sizes, trans_b))
        out = loop_mm(a.float(), b.float(), batch_sizes).to(a.dtype)
        calls.append(out)
        return out

    package = types.ModuleType("grouped_gemm")
    ops = types.ModuleType("grouped_gemm.ops")
    ops.gmm = gmm
    package.ops = ops
    monkeypatch.setitem(sys.modules, "grouped_gemm", package)
    monkeypatch.setitem(sys.modules, "grouped_gemm.ops", ops)
    monkeypatch.setattr(megablocks, "_GMM", [])           # the import is cached per process
    monkeypatch.setattr(megablocks, "_IMPORT_ERROR", [])
    return calls


def test_megablocks_adapter_against_fake_gmm(monkeypatch):
    calls = fake_grouped_gemm(monkeypatch)
    sizes = torch.tensor([3, 0, 2], dtype=torch.int32)
    x = torch.randn(5, 16, dtype=torch.bfloat16)[:, ::2]               # not contiguous
    w = torch.randn(3, 4, 8, dtype=torch.bfloat16).transpose(1, 2)     # [3, 8, 4], not contiguous
    y = megablocks.megablocks_mm(x, w, sizes)
    a, b, batch_sizes, trans_b = calls[0]
    assert a.is_contiguous() and b.is_contiguous() and trans_b is False
    assert batch_sizes.dtype == torch.int64 and batch_sizes.device.type == "cpu"
    assert batch_sizes.tolist() == [3, 0, 2]
    assert y is calls[1]  # returned unchanged
    torch.testing.assert_close(a, x)
    torch.testing.assert_close(b, w)


def test_megablocks_adapter_checks(monkeypatch):
    calls = fake_grouped_gemm(monkeypatch)
    sizes = torch.tensor([0, 0])
    x = torch.zeros(0, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    y = megablocks.megablocks_mm(x, w, sizes)   # all-zero sizes: gmm would assert, so not called
    assert y.shape == (0, 8) and not calls
    y.sum().backward()
    assert w.grad is not None and not w.grad.any()
    with pytest.raises(ValueError, match="bfloat16"):
        megablocks.megablocks_mm(torch.randn(2, 8), torch.randn(2, 8, 8), torch.tensor([1, 1]))
    assert megablocks.load_gmm() is sys.modules["grouped_gemm.ops"].gmm


def test_megablocks_unavailable_on_cpu():
    assert "megablocks" not in kernels.available_backends("cpu", torch.bfloat16)
    if not torch.cuda.is_available():
        assert not megablocks.is_available()
    x, w = make_inputs(torch.tensor([2]), 8, 8, torch.float32)
    with pytest.raises(kernels.BackendUnavailable, match="GPU install"):
        kernels.grouped_mm(x, w, torch.tensor([2]), backend="megablocks")


def test_megablocks_needs_gmm_itself_to_import(monkeypatch):
    """A grouped_gemm whose ops module does not import (no CUDA build, say) is not 'available':
    the reason names the failed import and the install hint; no megablocks fallback is tried."""
    broken = types.ModuleType("grouped_gemm")
    monkeypatch.setitem(sys.modules, "grouped_gemm", broken)
    monkeypatch.setitem(sys.modules, "grouped_gemm.ops", None)  # import raises ImportError
    monkeypatch.setattr(megablocks, "_GMM", [])
    monkeypatch.setattr(megablocks, "_IMPORT_ERROR", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend: only the import decides
    reason = megablocks.unavailable_reason(torch.device("cuda"), torch.bfloat16)
    assert "grouped_gemm.ops.gmm does not import" in reason and "GPU install" in reason
    assert not megablocks.is_available()
    with pytest.raises(RuntimeError, match="does not import"):
        megablocks.load_gmm()
    assert "fp32" not in reason and megablocks.unavailable_reason(torch.device("cuda"), torch.float32).startswith(
        "grouped_gemm supports")


# --- empty experts: zero weight gradients from the adapter, whatever the kernel -----------------

EMPTY_PLACES = {"start": [0, 3, 2, 4], "middle": [3, 0, 0, 4], "end": [3, 2, 4, 0], "all_but_one": [0, 9, 0, 0]}


@pytest.mark.parametrize("place", list(EMPTY_PLACES))
@pytest.mark.parametrize("backend", ["loop", "padded", "grouped", "blocksparse", "megablocks"])
def test_empty_groups_get_exactly_zero_weight_grad(backend, place, monkeypatch):
    sizes = torch.tensor(EMPTY_PLACES[place])
    dtype = torch.bfloat16 if backend == "megablocks" else torch.float32
    if backend == "megablocks":
        fake_grouped_gemm(monkeypatch)
        monkeypatch.setattr(megablocks, "unavailable_reason", lambda device, dtype: None)
        monkeypatch.setitem(kernels._REGISTRY, "megablocks", (megablocks.megablocks_mm, megablocks.unavailable_reason))
        monkeypatch.setattr(kernels, "_CHOICES", {})
    elif backend not in kernels.available_backends("cpu", dtype):
        pytest.skip(f"{backend} unavailable on cpu/{dtype}")
    x, w = make_inputs(sizes, 8, 8, dtype)
    y, dx, dw = run(lambda a, b, s: kernels.grouped_mm(a, b, s, backend), x, w, sizes)
    empty = sizes == 0
    assert torch.equal(dw[empty], torch.zeros_like(dw[empty]))
    ref_y, ref_dx, ref_dw = run(loop_mm, x, w, sizes)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, ref_dw, **tol)
    torch.testing.assert_close(dx, ref_dx, **tol)


@pytest.mark.parametrize("place", list(EMPTY_PLACES))
def test_adapter_zeroes_garbage_a_kernel_leaves_in_empty_groups(place, monkeypatch):
    """A kernel whose backward leaves empty groups' dw uninitialised (NaN here, as grouped_gemm
    issue #36 describes) still yields exact zeros for them through grouped_mm."""

    class GarbageDW(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, sizes):
            ctx.save_for_backward(x, w, sizes)
            return loop_mm(x, w, sizes)

        @staticmethod
        def backward(ctx, dy):
            x, w, sizes = ctx.saved_tensors
            with torch.enable_grad():
                xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
                dx, dw = torch.autograd.grad(loop_mm(xx, ww, sizes), (xx, ww), dy)
            dw = dw.clone()
            dw[sizes == 0] = float("nan")
            return dx, dw, None

    monkeypatch.setitem(kernels._REGISTRY, "loop", (GarbageDW.apply, kernels.loop.unavailable_reason))
    sizes = torch.tensor(EMPTY_PLACES[place])
    x, w = make_inputs(sizes, 4, 4, torch.float32)
    _, dx, dw = run(lambda a, b, s: kernels.grouped_mm(a, b, s, "loop"), x, w, sizes)
    _, ref_dx, ref_dw = run(loop_mm, x, w, sizes)
    assert torch.equal(dw[sizes == 0], torch.zeros_like(dw[sizes == 0]))
    torch.testing.assert_close(dw, ref_dw)
    torch.testing.assert_close(dx, ref_dx)


# --- selection and errors ---------------------------------------------------------------------

def test_unknown_backend_lists_valid_names():
    x, w = make_inputs(torch.tensor([2]), 4, 4, torch.float32)
    with pytest.raises(ValueError, match="loop, padded, grouped"):
        kernels.grouped_mm(x, w, torch.tensor([2]), backend="cutlass")
    with pytest.raises(ValueError, match="unknown"):
        kernels.resolve_backend("nope", "cpu", torch.float32)


def test_auto_resolution_on_cpu():
    assert kernels.resolve_backend("auto", "cpu", torch.float64) == "loop"
    expected = "grouped" if "grouped" in kernels.available_backends("cpu", torch.float32) else "loop"
    assert kernels.resolve_backend("auto", "cpu", torch.float32) == expected
    assert kernels.resolve_backend("padded", "cpu", torch.float32) == "padded"
    assert {"loop", "padded", "blocksparse"} <= set(kernels.available_backends("cpu", torch.float32))


def test_choice_names_every_skipped_backend_and_why():
    if "grouped" not in kernels.available_backends("cpu", torch.float32):
        pytest.skip("grouped unavailable")
    c = kernels.choose_backend("auto", "cpu", torch.float32, (16, 48))
    assert c.backend == "grouped" and not c.slow
    assert set(c.skipped) == {"padded", "blocksparse", "megablocks"}  # not in CPU auto's order
    odd = kernels.choose_backend("auto", "cpu", torch.bfloat16, (16, 62))
    assert odd.backend == "loop" and "multiples of 8" in odd.skipped["grouped"]
    assert "skipped: grouped: widths [62]" in odd.describe()
    assert kernels.choose_backend("auto", "cpu", torch.float64).skipped["grouped"].startswith("torch._grouped_mm")
    # On CUDA without grouped_gemm and with widths grouped cannot take, auto lands on the loop: slow.
    cuda = kernels.Choice("auto", "loop", "cuda", torch.bfloat16, {"megablocks": "x", "grouped": "y"})
    assert cuda.slow and not kernels.Choice("loop", "loop", "cuda", torch.bfloat16).slow


def test_auto_handles_widths_grouped_cannot():
    """torch._grouped_mm needs 16-byte strides; auto falls back to the loop, explicit fails clearly."""
    sizes = torch.tensor([2, 3])
    x, w = make_inputs(sizes, 5, 3, torch.float32)
    torch.testing.assert_close(kernels.grouped_mm(x, w, sizes), loop_mm(x, w, sizes))
    if "grouped" in kernels.available_backends("cpu", torch.float32):
        with pytest.raises(kernels.BackendUnavailable, match="multiples of 4"):
            kernels.grouped_mm(x, w, sizes, backend="grouped")


def test_bad_group_sizes_and_shapes():
    x, w = make_inputs(torch.tensor([2, 2]), 4, 4, torch.float32)
    with pytest.raises(ValueError, match="sum to N"):
        kernels.grouped_mm(x, w, torch.tensor([1, 2]), backend="loop")
    with pytest.raises(ValueError, match="shape"):
        kernels.grouped_mm(x, w, torch.tensor([4]), backend="loop")
    with pytest.raises(ValueError, match="d_in"):
        kernels.grouped_mm(x[:, :3], w, torch.tensor([2, 2]))


def test_import_pulls_in_no_gpu_library():
    code = ("import sys, kernels, torch; kernels.available_backends('cpu', torch.float32); "
            "kernels.available_backends('cuda', torch.bfloat16); "
            "bad = [m for m in ('megablocks', 'grouped_gemm', 'triton', 'stk') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
