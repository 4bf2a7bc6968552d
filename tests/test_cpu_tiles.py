"""The CPU tile kernels (csrc/cpu/tiles.h): they are what runs, they are right on shapes that fit no block
(hidden sizes past a tile, batches past a row block, depths past the two-accumulator unroll, packed
sequences), and what they keep in memory is bounded per process."""
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import gatedrnn
import gatedrnn.functional
from gatedrnn import reference
from utils import flat_outputs, weighted_sum


def calls_during(fn):
    """How many calls each tile kernel got while fn ran."""
    before = gatedrnn._extension.kernel_calls()
    fn()
    after = gatedrnn._extension.kernel_calls()
    return {name: after[name] - before.get(name, 0) for name in after}


@pytest.mark.parametrize("mode,proj", [("LSTM", 0), ("LSTM", 3), ("GRU", 0)])
def test_the_fused_step_kernels_run_once_per_step_and_thread(mode, proj):
    """One call of the fused step kernel per step and team member, forward and backward: the recurrent
    product and the cell update are one kernel, not a GEMM followed by a pointwise pass."""
    T, team = 7, gatedrnn.backend_info()["cpu_team_size"]
    module = getattr(gatedrnn, mode)(5, 6, **({"proj_size": proj} if proj else {}))
    x = torch.randn(T, 4, 5, requires_grad=True)
    prefix = mode.lower()
    with torch.no_grad():
        infer = calls_during(lambda: module(x))
    assert infer[f"{prefix}_forward_step"] == T * team
    assert infer[f"{prefix}_input_projection"] == team  # one chunk of steps
    assert infer[f"{prefix}_backward_step"] == 0
    train = calls_during(lambda: module(x)[0].sum().backward())
    assert train[f"{prefix}_forward_step"] == T * team
    assert train[f"{prefix}_backward_step"] == T * team
    if proj:
        assert infer["lstm_projection"] == T * team
        assert train["lstm_backward_projection"] == T * team


def test_a_long_inference_call_projects_its_input_in_chunks():
    """The input projection of an inference call is computed a chunk of steps at a time (so that its buffer
    does not grow with T): more chunks for a longer sequence, each a single kernel call per thread."""
    team = gatedrnn.backend_info()["cpu_team_size"]
    module = gatedrnn.GRU(8, 256)  # 3 KiB of projection per row: about 1365 rows per 4 MiB chunk
    with torch.no_grad():
        short = calls_during(lambda: module(torch.randn(10, 64, 8)))["gru_input_projection"]
        long = calls_during(lambda: module(torch.randn(400, 64, 8)))["gru_input_projection"]
    assert short == team and long >= 10 * team


# Shapes that fit no block: H past the tile width (16/8/4 lanes) and past a 4-group backward tile, B past
# the row blocks (6/7 rows with AVX-512, 3 with AVX2, 2-3 baseline), input and state depths odd (the B=1
# product splits k into even and odd halves).
RAGGED = list(itertools.product([1, 5, 17, 70], [1, 3, 8, 13], [1, 3, 20]))


def _compare_with_reference(mode, I, H, B, proj, packed):
    """Outputs, final states and every gradient of the fused ops against the pure-PyTorch oracle (float64,
    bidirectional, random initial states), through the same layer orchestration."""
    torch.manual_seed(0)
    module = getattr(gatedrnn, mode)(I, H, bidirectional=True, **({"proj_size": proj} if proj else {})).double()
    weights = list(module._flat_weights)
    T = 6
    x = torch.randn(T, B, I, dtype=torch.float64)
    if packed:
        lengths = torch.tensor([T] + [1 + (3 * k) % T for k in range(1, B)])
        sequence = pack_padded_sequence(x, lengths, enforce_sorted=False)
        data, batch_sizes = sequence.data, sequence.batch_sizes
    else:
        data, batch_sizes = x, None
    states = [torch.randn(2, B, proj or H, dtype=torch.float64)]
    if mode == "LSTM":
        states.append(torch.randn(2, B, H, dtype=torch.float64))
    kwargs = dict(bidirectional=True, **({"proj": True} if proj else {}))

    def run(implementation):
        leaves = [t.detach().requires_grad_() for t in [data] + states + weights]
        fn = getattr(implementation, mode.lower())
        output, finals = fn(leaves[0], batch_sizes, *leaves[1:1 + len(states)], leaves[1 + len(states):], **kwargs)
        outputs = [output] + list(finals if isinstance(finals, tuple) else (finals,))
        return outputs + list(torch.autograd.grad(weighted_sum(outputs), leaves))

    for actual, expected in zip(run(gatedrnn.functional), run(reference)):
        torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("H,B,I", RAGGED)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_ragged_shapes_against_the_reference(mode, H, B, I):
    _compare_with_reference(mode, I, H, B, proj=0, packed=False)


@pytest.mark.parametrize("H,B,I", [(17, 13, 3), (70, 8, 1), (5, 1, 20)])
@pytest.mark.parametrize("proj", [0, 1, 4])
def test_ragged_packed_and_projected_against_the_reference(H, B, I, proj):
    if proj >= H:
        pytest.skip("proj_size must be smaller than hidden_size")
    _compare_with_reference("LSTM", I, H, B, proj=proj, packed=True)
    if not proj:
        _compare_with_reference("GRU", I, H, B, proj=0, packed=True)


@pytest.mark.parametrize("H,B,I", [(17, 13, 3), (70, 1, 20)])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_ragged_shapes_against_torch_nn_float32(mode, H, B, I):
    torch.manual_seed(0)
    ref = getattr(nn, mode)(I, H, num_layers=2)
    ours = getattr(gatedrnn, mode)(I, H, num_layers=2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(9, B, I)
    results = []
    for module in (ref, ours):
        leaf = x.clone().requires_grad_()
        output, states = flat_outputs(module(leaf))
        grads = torch.autograd.grad(weighted_sum([output] + states), [leaf] + list(module.parameters()))
        results.append([output] + states + list(grads))
    for e, a in zip(*results):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-4)


# The most rows a weight multiplies in one call and is still read in place (kInPlaceRows, csrc/cpu/products.h).
IN_PLACE_ROWS = 16


@pytest.mark.parametrize("T,B,in_place", [(1, 1, True), (1, 16, True), (16, 1, True), (4, 4, True), (1, 17, False),
                                          (17, 1, False), (6, 3, False)])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_weights_are_read_in_place_exactly_when_they_multiply_few_rows(mode, T, B, in_place):
    """A call whose T * B rows are at most IN_PLACE_ROWS multiplies W_ih and W_hh where they lie (dot
    products), with no packing; a longer one packs both, the fused step kernel running either way."""
    module = getattr(gatedrnn, mode)(5, 6)
    with torch.no_grad():
        calls = calls_during(lambda: module(torch.randn(T, B, 5)))
    assert T * B <= IN_PLACE_ROWS if in_place else T * B > IN_PLACE_ROWS
    assert calls["weights_read_in_place"] == (2 if in_place else 0)
    assert calls[f"{mode.lower()}_forward_step"] == T * gatedrnn.backend_info()["cpu_team_size"]


# Depths (I, and H for W_hh) below, at and past a multiple of every SIMD width (16/8/4/2 lanes), hidden sizes
# with full and partial groups of lanes, and every batch up to the in-place limit's edge.
@pytest.mark.parametrize("I,H", [(1, 1), (3, 17), (16, 16), (20, 33), (37, 70)])
@pytest.mark.parametrize("B", [1, 5, 16])
@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell"])
def test_cells_read_in_place_against_torch_nn(mode, I, H, B):
    """A cell's single step reads its weights in place: outputs and every gradient against torch.nn in
    float64, and the counters that prove the in-place product ran, that the backward packed no W_hh (a
    single step has no later step to multiply), and that the input gradient of a single row (B=1) was ATen's
    matrix-vector product (cpu_matmul), and of more rows not."""
    torch.manual_seed(0)
    ref = getattr(nn, mode)(I, H).double()
    ours = getattr(gatedrnn, mode)(I, H).double()
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, I, dtype=torch.float64, generator=g)
    h, c = torch.randn(B, H, dtype=torch.float64, generator=g), torch.randn(B, H, dtype=torch.float64, generator=g)
    results = []
    for module in (ref, ours):
        leaf = x.clone().requires_grad_()
        state = (h, c) if mode == "LSTMCell" else h
        made = []
        calls = calls_during(lambda: made.append(module(leaf, state)))
        out = list(made[0]) if mode == "LSTMCell" else made
        backward_calls = calls_during(lambda: results.append(
            out + list(torch.autograd.grad(weighted_sum(out), [leaf] + list(module.parameters())))))
    assert calls["weights_read_in_place"] == 2
    assert backward_calls["later_step_weights_packed"] == 0
    # A single-row product: the input gradient at B=1 (the GRU's in two parts); the GRU's n-gate weight
    # gradients at H=1 (d_n^T has H rows).
    one_row = B == 1 or (mode == "GRUCell" and H == 1)
    assert (backward_calls["aten_one_row_products"] > 0) == one_row
    assert backward_calls[f"{mode[:-len('Cell')].lower()}_backward_step"] >= 1
    for e, a in zip(*results):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


@pytest.mark.filterwarnings("ignore:gatedrnn. differentiating through")  # the reference's backward, asked for
@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("mode,variant", [("LSTM", {}), ("LSTM", {"proj_size": 3}), ("LSTM", {"layer_norm": True}),
                                          ("GRU", {}), ("GRU", {"reset_after": False}), ("GRU", {"layer_norm": True})])
def test_the_backward_packs_w_hh_only_where_a_later_step_multiplies_it(mode, variant, T):
    """The backward loop multiplies each step's gradients by W_hh for the step before it; a one-step call
    (T = 1) has no such product and packs no W_hh: the counter stays at 0, and is 1 per layer and direction
    from T = 2 on. The gradients either way against the float64 reference (create_graph=True differentiates
    the reference layer, gatedrnn/reference.py)."""
    torch.manual_seed(0)
    module = getattr(gatedrnn, mode)(5, 6, **variant).double()
    x = torch.randn(T, 2, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, variant.get("proj_size") or 6, dtype=torch.float64, requires_grad=True)
    state = (h0, torch.randn(1, 2, 6, dtype=torch.float64)) if mode == "LSTM" else h0
    leaves = [x, h0] + list(module.parameters())
    grads = []
    for create_graph in (False, True):
        output, states = flat_outputs(module(x, state))
        loss = weighted_sum([output] + states)
        calls = calls_during(lambda: grads.append(torch.autograd.grad(loss, leaves, create_graph=create_graph)))
        if not create_graph:
            assert calls["later_step_weights_packed"] == (0 if T == 1 else 1)
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


MEMORY_CHECK = textwrap.dedent(r"""
    import json, os, sys, threading, time, torch, gatedrnn
    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    impl = torch.nn if sys.argv[1] == "torch.nn" else gatedrnn
    lstm, gru = impl.LSTM(512, 512), impl.GRU(512, 512)
    x = torch.randn(200, 64, 512)
    with torch.no_grad():
        lstm(x)
    base = rss_mib()
    ready, release = [threading.Event() for _ in range(8)], threading.Event()
    def work(event):
        with torch.no_grad():
            lstm(x), gru(x)
        y = x.clone().requires_grad_()
        lstm(y)[0].sum().backward()
        gru(y)[0].sum().backward()
        event.set()
        release.wait()
    threads = [threading.Thread(target=work, args=(e,)) for e in ready]
    for t in threads:
        t.start()
    for e in ready:
        e.wait()
    scratch = gatedrnn._extension.scratch_bytes() if impl is gatedrnn else 0
    saved_cache = gatedrnn._extension.saved_cache_bytes() if impl is gatedrnn else 0
    rss = rss_mib() - base
    release.set()
    for t in threads:
        t.join()
    # join() returns when the Python thread is done; its C++ thread-locals are destroyed just after.
    after, deadline = gatedrnn._extension.scratch_bytes(), time.time() + 10
    while after >= 16 * 2**20 and time.time() < deadline:
        time.sleep(0.05)
        after = gatedrnn._extension.scratch_bytes()
    print(json.dumps({"rss_mib": rss, "scratch": scratch, "scratch_after": after, "saved_cache": saved_cache}))
""")


def _memory_after_eight_threads(impl):
    result = subprocess.run([sys.executable, "-c", MEMORY_CHECK, impl], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_scratch_is_capped_per_process_not_per_thread():
    """8 live threads, each of which ran LSTM and GRU inference and training at T=200 B=64 I=H=512 (52 MB of
    gate gradients per backward call): the scratch all of them keep stays within the process cap (256 MiB,
    where per-thread buffers would hold over 400 MiB), and is returned when the threads exit; the saved
    buffers their training calls left (saved_cache.h) stay within their own cap of 256 MiB. Their RSS
    grows no more than torch.nn's does under the same load plus those two caps (glibc's per-thread arenas
    keep freed memory for both alike)."""
    ours = _memory_after_eight_threads("gatedrnn")
    theirs = _memory_after_eight_threads("torch.nn")
    cap = 256 * 2**20
    assert 0 < ours["scratch"] <= cap
    assert ours["scratch_after"] < 16 * 2**20  # the main thread's: inference chunk and packed weights
    assert 0 < ours["saved_cache"] <= cap
    assert ours["rss_mib"] <= theirs["rss_mib"] + 256 + 256, (ours, theirs)


# ---------------------------------------------------------------------------------------------- bfloat16
def _has_bf16_tiles():
    with torch.no_grad():
        calls = calls_during(lambda: gatedrnn.GRU(3, 4).bfloat16()(torch.randn(2, 1, 3).bfloat16()))
    return calls.get("gru_forward_step_bf16", 0) > 0


HAS_BF16_TILES = _has_bf16_tiles()
needs_bf16_tiles = pytest.mark.skipif(not HAS_BF16_TILES, reason="this CPU has no AVX512_BF16 (or its ISA is capped)")


def _cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_bf16_tiles_are_used_exactly_where_the_cpu_has_avx512_bf16():
    flags = _cpu_flags()
    expected = "avx512_bf16" in flags and gatedrnn.backend_info()["cpu_isa"] == "avx512"
    assert HAS_BF16_TILES == expected, (flags & {"avx512_bf16", "avx512f"}, gatedrnn.backend_info()["cpu_isa"])
    assert gatedrnn.backend_info()["cpu_bf16_tiles"] == HAS_BF16_TILES


@needs_bf16_tiles
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_bf16_inference_runs_the_bf16_tiles_and_training_the_float32_ones(mode):
    module = getattr(gatedrnn, mode)(5, 6).bfloat16()
    x = torch.randn(7, 3, 5).bfloat16()
    prefix = mode.lower()
    with torch.no_grad():
        infer = calls_during(lambda: module(x))
    assert infer[f"{prefix}_forward_step_bf16"] > 0 and infer[f"{prefix}_forward_step"] == 0
    train = calls_during(lambda: module(x.requires_grad_())[0].float().sum().backward())
    assert train[f"{prefix}_forward_step_bf16"] == 0 and train[f"{prefix}_forward_step"] > 0


@needs_bf16_tiles
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("H,B,I,packed", [(17, 13, 3, False), (70, 1, 20, False), (33, 8, 7, True), (64, 37, 64, False),
                                           (48, 50, 96, True), (32, 32, 32, False)])
def test_bf16_inference_against_float64(mode, H, B, I, packed):
    """bfloat16 products with float32 accumulation: within bfloat16's resolution of the float64 answer of
    the same (bfloat16-rounded) weights and input, and no further from it than torch.nn's bfloat16 path
    (oneDNN) where torch.nn has one. On AMX the shapes cover A read in place (k a multiple of 32, 16 evenly
    spaced rows) and copied (odd or short k, short blocks, packed steps), 32-row and 16-row products."""
    torch.manual_seed(0)
    ref = getattr(nn, mode)(I, H, num_layers=2, bidirectional=True).bfloat16()
    ours = getattr(gatedrnn, mode)(I, H, num_layers=2, bidirectional=True).bfloat16()
    ours.load_state_dict(ref.state_dict())
    exact_module = getattr(nn, mode)(I, H, num_layers=2, bidirectional=True).double()
    exact_module.load_state_dict(ref.state_dict())
    x = torch.randn(9, B, I).bfloat16()
    lengths = torch.tensor([9] + [1 + (4 * k) % 9 for k in range(1, B)])

    def run(module, dtype):
        inp = x.to(dtype)
        inp = pack_padded_sequence(inp, lengths, enforce_sorted=False) if packed else inp
        with torch.no_grad():
            output, states = flat_outputs(module(inp))
        return [t.double() for t in [output] + states]

    exact = run(exact_module, torch.float64)
    for got, want, theirs in zip(run(ours, torch.bfloat16), exact, run(ref, torch.bfloat16)):
        error = (got - want).abs().max().item()
        torch_error = (theirs - want).abs().max().item()
        assert error < 2e-2, error
        assert error <= max(2 * torch_error, 4e-3), (error, torch_error)


@needs_bf16_tiles
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("I", [40, 41])
def test_bf16_weights_of_any_layout_give_the_same_bits(mode, I):
    """The bfloat16 panels are gathered a k pair at a time from weights whose rows are contiguous in k (an odd
    depth's last k copied alone), and copied element by element from any other layout: the same panels, so
    the same bits."""
    torch.manual_seed(0)
    ops, H, B, gates = torch.ops.gatedrnn, 48, 19, 4 if mode == "LSTM" else 3
    x, h, c = torch.randn(5, B, I).bfloat16(), torch.randn(B, H).bfloat16(), torch.randn(B, H).bfloat16()
    w_ih, w_hh = torch.randn(gates * H, I).bfloat16(), torch.randn(gates * H, H).bfloat16()
    b_ih, b_hh = torch.randn(gates * H).bfloat16(), torch.randn(gates * H).bfloat16()

    def run(w_ih, w_hh):
        with torch.no_grad():
            if mode == "LSTM":
                return ops.lstm_forward(x, None, h, c, w_ih, w_hh, b_ih, b_hh, None, False, False)[:3]
            return ops.gru_forward(x, None, h, w_ih, w_hh, b_ih, b_hh, False, False)[:2]

    def column_major(w):
        return w.t().contiguous().t()

    calls = calls_during(lambda: run(w_ih, w_hh))
    assert calls[f"{mode.lower()}_forward_step_bf16"] > 0
    for got, want in zip(run(column_major(w_ih), column_major(w_hh)), run(w_ih, w_hh)):
        assert torch.equal(got, want)


def _has_amx():
    with torch.no_grad():
        calls = calls_during(lambda: gatedrnn.LSTM(3, 4).bfloat16()(torch.randn(2, 1, 3).bfloat16()))
    return calls.get("bf16_amx_products", 0) > 0


HAS_AMX = _has_amx()


def test_amx_runs_exactly_where_the_cpu_has_amx_bf16():
    """backend_info() names it, the counter proves it: bfloat16 inference runs its products on AMX where the
    CPU has AMX-BF16 and the bfloat16 tiles are on (Linux grants the tile state on request since 5.16)."""
    flags = _cpu_flags()
    kernel = tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])
    expected = HAS_BF16_TILES and {"amx_bf16", "amx_tile"} <= flags and kernel >= (5, 16)
    assert HAS_AMX == expected, (flags & {"amx_bf16", "amx_tile"}, HAS_BF16_TILES, kernel)
    assert gatedrnn.backend_info()["cpu_bf16_amx"] == HAS_AMX


@pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX-BF16 (or its ISA is capped): the vdpbf16ps tiles "
                                        "already run in test_bf16_inference_against_float64")
def test_bf16_tiles_without_amx_against_float64():
    """GATEDRNN_CPU_AMX=0 turns AMX off, so that the vdpbf16ps tiles, which AVX512_BF16 CPUs without AMX run
    (AMD Zen 4 and 5), are tested on an AMX machine too: the float64 comparison in a process without AMX."""
    code = ("import torch, gatedrnn; m = gatedrnn.GRU(4, 5).bfloat16()\n"
            "with torch.no_grad(): m(torch.randn(3, 2, 4).bfloat16())\n"
            "c = gatedrnn._extension.kernel_calls(); print(gatedrnn.backend_info()['cpu_bf16_amx'],"
            " c.get('bf16_amx_products', 0), c['gru_forward_step_bf16'])")
    env = dict(os.environ, GATEDRNN_CPU_AMX="0")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "0", result.stdout.split()[2]] and int(result.stdout.split()[2]) > 0
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             f"{__file__}::test_bf16_inference_against_float64"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and " passed" in result.stdout and "skipped" not in result.stdout, result.stdout


def test_capping_the_isa_turns_the_bf16_tiles_off():
    code = ("import torch, gatedrnn; m = gatedrnn.LSTM(4, 5).bfloat16()\n"
            "with torch.no_grad(): m(torch.randn(3, 2, 4).bfloat16())\n"
            "c = gatedrnn._extension.kernel_calls(); print(c.get('lstm_forward_step_bf16', 0), c['lstm_forward_step'])")
    env = dict(__import__("os").environ, GATEDRNN_CPU_ISA="avx2")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    bf16_calls, float_calls = map(int, result.stdout.split())
    assert bf16_calls == 0 and float_calls > 0


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_an_empty_sequence_passes_the_state_gradient_through(mode):
    """T = 0 at the op level (the modules refuse it, as torch.nn does): h_n is h0, so grad_hx is grad_hy (and
    grad_cx is grad_cy); the weights get zero gradients."""
    ops, H = torch.ops.gatedrnn, 4
    x = torch.randn(0, 2, 3, dtype=torch.float64)
    h, c, gh, gc = (torch.randn(2, H, dtype=torch.float64) for _ in range(4))
    gates = 4 if mode == "LSTM" else 3
    w_ih, w_hh = torch.randn(gates * H, 3, dtype=torch.float64), torch.randn(gates * H, H, dtype=torch.float64)
    if mode == "LSTM":
        out = ops.lstm_forward(x, None, h, c, w_ih, w_hh, None, None, None, False, True)
        torch.testing.assert_close(out[1], h)
        torch.testing.assert_close(out[2], c)
        grads = ops.lstm_backward(out[0], gh, gc, x, None, h, c, w_ih, w_hh, None, out[0], out[3], out[4], False,
                                  [True, True, True])
        torch.testing.assert_close(grads[1], gh)
        torch.testing.assert_close(grads[2], gc)
        weight_grads = grads[3:5]
    else:
        out = ops.gru_forward(x, None, h, w_ih, w_hh, None, None, False, True)
        torch.testing.assert_close(out[1], h)
        grads = ops.gru_backward(out[0], gh, x, None, h, w_ih, w_hh, out[0], out[2], False, [True, True, True])
        torch.testing.assert_close(grads[1], gh)
        weight_grads = grads[2:4]
    for g in weight_grads:
        assert not g.abs().any()


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_post_loop_tile_gemm_past_its_blocks_against_torch_nn(isa):
    """The post-loop GEMM on the tiles (GATEDRNN_CPU_GEMM=tiles) where its blocking shows: dW = dG^T X reads
    dG^T a block of 96 rows x 256 k at a time into each thread's buffer (csrc/cpu/matmul.cpp), so T x B = 540
    is three depth blocks (the last of 28) and 4H = 400 five such blocks of rows (the last of 16); dx = dG W_ih
    reads A in place. Float64 against torch.nn, in a subprocess per instruction set (the GEMM is chosen per process);
    the kernel counter proves the tiles ran."""
    code = textwrap.dedent("""
        import torch, gatedrnn
        from torch import nn
        torch.manual_seed(0)
        worst = 0.0
        for mode in ("LSTM", "GRU"):
            ref = getattr(nn, mode)(7, 100).double()
            ours = getattr(gatedrnn, mode)(7, 100).double()
            ours.load_state_dict(ref.state_dict())
            results = []
            for module in (ref, ours):
                x = torch.randn(60, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
                x.requires_grad_()
                out = module(x)[0]
                grads = torch.autograd.grad(out.square().sum(), [x] + list(module.parameters()))
                results.append(grads)
            worst = max([worst] + [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*results)])
        info = gatedrnn.backend_info()
        print(info["cpu_isa"], info["cpu_gemm"], gatedrnn._extension.kernel_calls()["matmul"], worst)
    """)
    env = dict(os.environ, GATEDRNN_CPU_GEMM="tiles", GATEDRNN_CPU_ISA=isa)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ran, gemm, matmul_calls, worst = result.stdout.split()
    if ran != isa:
        pytest.skip(f"this CPU cannot run the {isa} tiles (ran {ran})")
    assert gemm == "tiles" and int(matmul_calls) > 0
    assert float(worst) < 1e-12, worst
