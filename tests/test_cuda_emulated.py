"""The CUDA sources, run on the CPU: csrc/cuda/lstm.cu and gru.cu compiled by the host compiler against
csrc/cuda/emulation.h (each kernel launch runs the kernel's blocks and threads as CPU threads, with real
barriers for __syncthreads) into a test library, torch.ops.gatedrnn_emulated. Its ops must give what the CPU
ops give (those are proven against torch.nn in test_parity): this checks the CUDA code's indexing, packed and
reverse schedules, block tiling (several row blocks and unit tiles, ragged edges, every rows-per-thread
shape), K chunking, the backward carry and the tensor-core path's data flow, without a GPU. It cannot check
the GPU's memory model, the tensor cores' fragment layouts or speed: tests/test_cuda.py does, on a GPU."""
import itertools

import pytest
import torch

import emulated_cuda
import gatedrnn  # torch.ops.gatedrnn: the CPU ops, the oracle here
from emulated_cuda import make_args, run_forward_backward
from gatedrnn import _ops


@pytest.fixture(scope="module")
def emulated():
    # .ci/sanitize runs this file with GATEDRNN_EMULATION_SANITIZER=address (out-of-bounds indexing in a kernel
    # is fatal) and =thread (a race on shared memory is fatal).
    emulated_cuda.load_library(emulated_cuda.sanitizer())
    # The package's fake kernels describe these ops too (same schemas), so that opcheck can run on them.
    for op in gatedrnn._extension.OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"gatedrnn_emulated::{op}", "Meta"):
            torch.library.register_fake(f"gatedrnn_emulated::{op}")(getattr(_ops, f"_{op}_fake"))
    return torch.ops.gatedrnn_emulated


def _configs():
    for mode, packed, reverse, bias, proj in itertools.product(["LSTM", "GRU"], [False, True], [False, True],
                                                                [True, False], [0, 20]):
        if mode == "GRU" and proj:
            continue
        yield mode, packed, reverse, bias, proj


def _id(config):
    mode, packed, reverse, bias, proj = config
    return (f"{mode}-{'packed' if packed else 'dense'}-{'rev' if reverse else 'fwd'}-"
            f"{'bias' if bias else 'nobias'}" + (f"-proj{proj}" if proj else ""))


# Batch sizes 3, 12 and 40 take the 1, 2 and 4 rows-per-thread kernels (40: two row blocks); hidden 40 makes
# two unit tiles, the second ragged, and a K loop of two chunks, the second ragged.
@pytest.mark.parametrize("batch", [3, 12, 40])
@pytest.mark.parametrize("config", list(_configs()), ids=_id)
def test_float64_matches_cpu_ops(emulated, config, batch):
    mode, packed, reverse, bias, proj = config
    args = make_args(mode, batch, 40, packed, bias, proj, torch.float64)
    expected = run_forward_backward(torch.ops.gatedrnn, mode, args, reverse)
    actual = run_forward_backward(emulated, mode, args, reverse)
    for part, (a_list, e_list) in zip(("forward", "backward"), zip(actual, expected)):
        for k, (a, e) in enumerate(zip(a_list, e_list)):
            assert a.dtype == e.dtype and a.shape == e.shape, (part, k)
            torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10, msg=lambda m: f"{part} output {k}: {m}")


@pytest.mark.parametrize("mode,proj", [("LSTM", 0), ("LSTM", 20), ("GRU", 0)])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_lengths(emulated, mode, proj, reverse):
    """Padded input with lengths (csrc/padded.h, shared by both devices) through the CUDA entry points: the
    packed schedule built from unsorted lengths, the state reordering and the padded saved activations."""
    args = make_args(mode, 12, 40, False, True, proj, torch.float64)
    steps = args[0].shape[0]
    lengths = torch.tensor([5, steps, 1, steps, 7, 3, 3, 9, 2, steps, 4, 6]).clamp(max=steps)  # unsorted, ties
    expected = run_forward_backward(torch.ops.gatedrnn, mode, args, reverse, lengths=lengths)
    actual = run_forward_backward(emulated, mode, args, reverse, lengths=lengths)
    for a_list, e_list in zip(actual, expected):
        for a, e in zip(a_list, e_list):
            assert a.shape == e.shape
            torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode,states", [("LSTM", "h"), ("LSTM", "c"), ("LSTM", "hc"), ("GRU", "h")])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_zoneout_and_dropout(emulated, mode, states, packed):
    """Zoneout keep values (cells.h) through the CUDA kernels: training draws (0/1 per row and unit) for the
    states named, evaluation's broadcast p (stride 0) for the others, forward and backward, both directions;
    with weight, recurrent and input dropout masks."""
    args = make_args(mode, 12, 40, packed, True, 0, torch.float64)
    rows, g = args[0].shape[0] * (1 if packed else args[0].shape[1]), torch.Generator().manual_seed(4)
    keep = {name: torch.empty(rows, 40, dtype=torch.float64).bernoulli_(0.4, generator=g) if state in states
            else torch.full((1, 1), 0.25, dtype=torch.float64).expand(rows, 40)
            for name, state in (("zoneout", "h"), ("zoneout_cell", "c")) if mode == "LSTM" or state == "h"}
    # And the dropout masks: weight dropout's and input dropout's, which the entry points shared with the CPU
    # apply (op_entry.h), and recurrent dropout's, which the kernels apply.
    keep["weight_hh_mask"] = (torch.rand(args[5 if mode == "LSTM" else 4].shape, generator=g) > 0.3).double() / 0.7
    keep["recurrent_mask"] = (torch.rand(12, 40, generator=g) > 0.4).double() / 0.6
    keep["input_mask"] = (torch.rand(12, args[0].shape[-1], generator=g) > 0.2).double() / 0.8
    for reverse in (False, True):
        expected = run_forward_backward(torch.ops.gatedrnn, mode, args, reverse, **keep)
        actual = run_forward_backward(emulated, mode, args, reverse, **keep)
        for a_list, e_list in zip(actual, expected):
            for a, e in zip(a_list, e_list):
                torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("batch", [3, 12, 40])
@pytest.mark.parametrize("packed,reverse,bias", [(False, False, True), (True, True, True), (False, True, False),
                                                 (True, False, False)], ids=str)
def test_gru_reset_before(emulated, batch, packed, reverse, bias):
    """GRU reset_after=False (gru_reset_before.cu: two launches per step, forward and backward) against the CPU
    ops, float64: every rows-per-thread shape, ragged unit tiles and K chunks, packed and reverse schedules."""
    args = make_args("GRU", batch, 40, packed, bias, 0, torch.float64)
    expected = run_forward_backward(torch.ops.gatedrnn, "GRU", args, reverse, reset_after=False)
    actual = run_forward_backward(emulated, "GRU", args, reverse, reset_after=False)
    for a_list, e_list in zip(actual, expected):
        for a, e in zip(a_list, e_list):
            assert a.dtype == e.dtype and a.shape == e.shape
            torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_gru_reset_before_variants(emulated, packed):
    """reset_after=False with zoneout and the three dropout masks, both directions, against the CPU ops."""
    args = make_args("GRU", 12, 40, packed, True, 0, torch.float64)
    rows, g = args[0].shape[0] * (1 if packed else args[0].shape[1]), torch.Generator().manual_seed(5)
    options = dict(zoneout=torch.empty(rows, 40, dtype=torch.float64).bernoulli_(0.4, generator=g),
                   weight_hh_mask=(torch.rand(120, 40, generator=g) > 0.3).double() / 0.7,
                   recurrent_mask=(torch.rand(12, 40, generator=g) > 0.4).double() / 0.6,
                   input_mask=(torch.rand(12, args[0].shape[-1], generator=g) > 0.2).double() / 0.8,
                   reset_after=False)
    for reverse in (False, True):
        expected = run_forward_backward(torch.ops.gatedrnn, "GRU", args, reverse, **options)
        actual = run_forward_backward(emulated, "GRU", args, reverse, **options)
        for a_list, e_list in zip(actual, expected):
            for a, e in zip(a_list, e_list):
                torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)],
                         ids=["float32", "bfloat16", "float16"])
def test_gru_reset_before_low_precision(emulated, dtype, bound):
    """reset_after=False in float32 and on the (emulated) tensor-core path of float16/bfloat16, within the dtype's
    resolution of the float64 answer."""
    exact_args = make_args("GRU", 40, 40, True, True, 0, torch.float64)
    exact = run_forward_backward(torch.ops.gatedrnn, "GRU", exact_args, False, reset_after=False)
    args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in exact_args]
    actual = run_forward_backward(emulated, "GRU", args, False, reset_after=False)
    for a_list, e_list in zip(actual, exact):
        for a, e in zip(a_list, e_list):
            if e.numel():
                assert ((a.double() - e).abs().max() / e.abs().max()).item() < bound


def test_gru_reset_before_opcheck(emulated):
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    args = make_args("GRU", 12, 40, True, True, 0, torch.float32)
    x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh = args
    options = dict(reset_after=False)
    for save in (False, True):
        torch.library.opcheck(emulated.gru_forward, (*args, True, save), options, test_utils=utils)
    out, hy, saved = emulated.gru_forward(*args, True, True, **options)
    torch.library.opcheck(emulated.gru_backward, (torch.randn_like(out), torch.randn_like(hy), x, batch_sizes, h0,
                                                  w_ih, w_hh, out, saved, True, [True, True, True]), options,
                          test_utils=utils)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("mask", [(False, True, False), (True, False, True), (False, False, False)], ids=str)
def test_output_mask(emulated, mode, mask):
    args = make_args(mode, 12, 40, True, True, 0, torch.float64)
    expected = run_forward_backward(torch.ops.gatedrnn, mode, args, True, mask)[1]
    actual = run_forward_backward(emulated, mode, args, True, mask)[1]
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode,proj", [("LSTM", 0), ("LSTM", 20), ("GRU", 0)])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)],
                         ids=["float32", "bfloat16", "float16"])
def test_low_precision_against_float64(emulated, mode, proj, dtype, bound):
    """float32 (FMA) and float16/bfloat16 (the tensor-core path, emulated): every output and gradient within
    the dtype's resolution of the float64 answer, relative to each tensor's largest magnitude."""
    exact_args = make_args(mode, 40, 40, True, True, proj, torch.float64)
    exact = run_forward_backward(torch.ops.gatedrnn, mode, exact_args, False)
    args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in exact_args]
    actual = run_forward_backward(emulated, mode, args, False)
    saved_dtype = torch.float32 if dtype != torch.float32 else dtype
    for part, (a_list, e_list) in zip(("forward", "backward"), zip(actual, exact)):
        for k, (a, e) in enumerate(zip(a_list, e_list)):
            if e.numel() == 0:
                continue
            saved = part == "forward" and k >= (3 if mode == "LSTM" else 2)
            assert a.dtype == (saved_dtype if saved else dtype), (part, k)
            error = ((a.double() - e).abs().max() / e.abs().max()).item()
            assert error < bound, (part, k, error)


@pytest.mark.parametrize("config", [c for c in _configs() if c[3]], ids=_id)
def test_opcheck(emulated, config):
    """torch.library.opcheck on the CUDA code: no input is mutated, and the outputs' shapes, dtypes and
    strides are what the fake kernels (torch.compile's view of the ops) say, for forward and backward."""
    mode, packed, reverse, bias, proj = config
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    args = make_args(mode, 12, 40, packed, bias, proj, torch.float32)
    if mode == "LSTM":
        x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = args
        for save in (False, True):
            torch.library.opcheck(emulated.lstm_forward, (*args, reverse, save), test_utils=utils)
        out, hy, cy, gates, cells = emulated.lstm_forward(*args, reverse, True)
        grads = (torch.randn_like(out), torch.randn_like(hy), torch.randn_like(cy))
        torch.library.opcheck(emulated.lstm_backward, (*grads, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates,
                                                       cells, reverse, [True, True, True]), test_utils=utils)
    else:
        x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh = args
        for save in (False, True):
            torch.library.opcheck(emulated.gru_forward, (*args, reverse, save), test_utils=utils)
        out, hy, saved = emulated.gru_forward(*args, reverse, True)
        grads = (torch.randn_like(out), torch.randn_like(hy))
        torch.library.opcheck(emulated.gru_backward, (*grads, x, batch_sizes, h0, w_ih, w_hh, out, saved, reverse,
                                                      [True, False, True]), test_utils=utils)


def test_hidden_size_beyond_the_largest_grid_is_refused(emulated):
    """A hidden_size with more unit tiles than a grid dimension holds is refused with a message before anything
    is allocated or launched (the weights here are expanded views of one element)."""
    hidden = 65535 * 32 + 1
    x, h0 = torch.randn(2, 1, 1), torch.zeros(1, hidden)
    w_ih, w_hh = torch.empty(1, 1).expand(3 * hidden, 1), torch.empty(1, 1).expand(3 * hidden, hidden)
    with pytest.raises(RuntimeError, match="hidden_size 2097121 is too large for the CUDA kernels"):
        emulated.gru_forward(x, None, h0, w_ih, w_hh, None, None, False, False)


def test_weights_at_an_odd_offset(emulated):
    """hidden_size 32 with proj_size 1 is the one shape whose re-laid-out forward weight tile is a
    contiguous view of W_hh itself: with W_hh one element into its storage, the 16-byte vector loads of
    the staged tiles would be misaligned (UBSan's alignment check under .ci/sanitize) unless the tiles are a
    fresh copy."""
    args = make_args("LSTM", 5, 32, False, True, 1, torch.float64)
    storage = torch.randn(args[5].numel() + 1, dtype=torch.float64)
    w_hh = storage[1:].view_as(args[5]).copy_(args[5])
    assert w_hh.storage_offset() == 1
    args[5] = w_hh
    expected = run_forward_backward(torch.ops.gatedrnn, "LSTM", args, False)
    actual = run_forward_backward(emulated, "LSTM", args, False)
    for a_list, e_list in zip(actual, expected):
        for a, e in zip(a_list, e_list):
            torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


def _layer_norm(mode, hidden, dtype=torch.float64, seed=7):
    """A layer_norm argument [2, columns] away from gain 1 and bias 0, so that both matter."""
    g = torch.Generator().manual_seed(seed)
    columns = (9 if mode == "LSTM" else 6) * hidden
    gains = 1 + 0.5 * torch.randn(columns, generator=g, dtype=torch.float64)
    return torch.stack([gains, 0.5 * torch.randn(columns, generator=g, dtype=torch.float64)]).to(dtype)


@pytest.mark.parametrize("batch", [3, 12, 40])
@pytest.mark.parametrize("packed,reverse,bias", [(False, False, True), (True, True, True), (False, True, False),
                                                 (True, False, False)], ids=str)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_layer_norm(emulated, mode, batch, packed, reverse, bias):
    """layer_norm (layer_norm.cu: a product launch and a row launch per step, forward and backward) against the
    CPU ops, float64: every output, saved row and gradient (the norms' included), every rows-per-thread shape,
    ragged unit tiles and K chunks, packed and reverse schedules."""
    args = make_args(mode, batch, 40, packed, bias, 0, torch.float64)
    options = dict(layer_norm=_layer_norm(mode, 40))
    expected = run_forward_backward(torch.ops.gatedrnn, mode, args, reverse, **options)
    actual = run_forward_backward(emulated, mode, args, reverse, **options)
    for a_list, e_list in zip(actual, expected):
        for a, e in zip(a_list, e_list):
            assert a.dtype == e.dtype and a.shape == e.shape
            torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("layout", ["dense", "packed", "lengths"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_layer_norm_variants(emulated, mode, layout):
    """layer_norm with zoneout (both states for the LSTM) and the three dropout masks, both directions."""
    packed = layout == "packed"
    args = make_args(mode, 12, 40, packed, True, 0, torch.float64)
    rows, g = args[0].shape[0] * (1 if packed else args[0].shape[1]), torch.Generator().manual_seed(5)
    gates = 4 if mode == "LSTM" else 3
    options = dict(zoneout=torch.empty(rows, 40, dtype=torch.float64).bernoulli_(0.4, generator=g),
                   weight_hh_mask=(torch.rand(gates * 40, 40, generator=g) > 0.3).double() / 0.7,
                   recurrent_mask=(torch.rand(12, 40, generator=g) > 0.4).double() / 0.6,
                   input_mask=(torch.rand(12, args[0].shape[-1], generator=g) > 0.2).double() / 0.8,
                   layer_norm=_layer_norm(mode, 40))
    if mode == "LSTM":
        options["zoneout_cell"] = torch.empty(rows, 40, dtype=torch.float64).bernoulli_(0.3, generator=g)
    if layout == "lengths":
        options["lengths"] = torch.tensor([emulated_cuda.T, 2, 5, 1, 3, 4, 6, 2, 1, 5, 3, 6])
    for reverse in (False, True):
        expected = run_forward_backward(torch.ops.gatedrnn, mode, args, reverse, **options)
        actual = run_forward_backward(emulated, mode, args, reverse, **options)
        for a_list, e_list in zip(actual, expected):
            for a, e in zip(a_list, e_list):
                torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 6e-3)],
                         ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_layer_norm_low_precision(emulated, mode, dtype, bound):
    """layer_norm in float32 and on the (emulated) tensor-core path of float16/bfloat16, within the dtype's
    resolution of the float64 answer: outputs and gradients, relative to each tensor's largest magnitude. The
    bounds are wider than the plain cells': the CPU ops themselves, computing in float32 from the same bfloat16
    tensors, are 2.5% off the LSTM's gates here (3.5% here, which also rounds the input projection and h_t to
    the storage dtype)."""
    exact_args = make_args(mode, 40, 40, True, True, 0, torch.float64)
    norm = _layer_norm(mode, 40)
    exact = run_forward_backward(torch.ops.gatedrnn, mode, exact_args, False, layer_norm=norm)
    args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in exact_args]
    actual = run_forward_backward(emulated, mode, args, False, layer_norm=norm.to(dtype))
    for a_list, e_list in zip(actual, exact):
        for a, e in zip(a_list, e_list):
            if e.numel():
                assert ((a.double() - e).abs().max() / e.abs().max()).item() < bound


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_layer_norm_opcheck(emulated, mode):
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    args = make_args(mode, 12, 40, True, True, 0, torch.float32)
    options = dict(layer_norm=_layer_norm(mode, 40, torch.float32))
    for save in (False, True):
        forward = emulated.lstm_forward if mode == "LSTM" else emulated.gru_forward
        torch.library.opcheck(forward, (*args, True, save), options, test_utils=utils)
    if mode == "LSTM":
        x, batch_sizes, h0, c0, w_ih, w_hh, _, _, w_hr = args
        out, hy, cy, gates, cells = emulated.lstm_forward(*args, True, True, **options)
        torch.library.opcheck(emulated.lstm_backward, (torch.randn_like(out), torch.randn_like(hy),
                                                       torch.randn_like(cy), x, batch_sizes, h0, c0, w_ih, w_hh,
                                                       w_hr, out, gates, cells, True, [True, True, True]), options,
                              test_utils=utils)
    else:
        x, batch_sizes, h0, w_ih, w_hh, _, _ = args
        out, hy, saved = emulated.gru_forward(*args, True, True, **options)
        torch.library.opcheck(emulated.gru_backward, (torch.randn_like(out), torch.randn_like(hy), x, batch_sizes,
                                                      h0, w_ih, w_hh, out, saved, True, [True, True, True]), options,
                              test_utils=utils)
