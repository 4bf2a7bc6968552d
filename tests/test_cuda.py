"""GPU-only checks of the CUDA kernels: low precision against float64, CUDA-graph capture, autocast,
determinism, packed sequences, and sizes whose indices pass 2^31. The parity, gradcheck and opcheck suites
(test_parity, test_ops, test_autocast) also run their CUDA variants on a GPU. Everything here skips, saying
why, on a machine without a GPU or without gatedrnn's CUDA kernels."""
import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import gatedrnn
from utils import flat_outputs, twins, weighted_sum

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
    pytest.mark.skipif(not gatedrnn.backend_info()["cuda"], reason="gatedrnn was built without CUDA kernels"),
]

MODES = [("LSTM", {}), ("LSTM", {"proj_size": 24}), ("GRU", {})]


def _ids(case):
    mode, kwargs = case
    return mode + ("-proj" if kwargs else "")


def _run(module, x, seed=2):
    """Output, final state and every gradient of a weighted-sum loss."""
    out, states = flat_outputs(module(x))
    leaf = x.data if isinstance(x, torch.nn.utils.rnn.PackedSequence) else x
    loss = weighted_sum([out] + states, seed=seed)
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, [leaf] + params if leaf.requires_grad else params)
    return [out] + states, list(grads)


def _relative_error(actual, exact):
    return ((actual.double().cpu() - exact).abs().max() / exact.abs().max().clamp_min(1e-3)).item()


@pytest.mark.parametrize("case", MODES, ids=_ids)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)],
                         ids=["float32", "bfloat16", "float16"])
def test_low_precision_against_float64(case, dtype, bound):
    """Outputs, states and gradients within the dtype's resolution of the float64 answer (computed by torch.nn
    on the CPU), or at most 3x as far from it as torch.nn's own CUDA path (cuDNN) in that dtype. Errors are
    relative to the largest magnitude of each tensor."""
    mode, kwargs = case
    exact_module, ours = twins(mode, 48, 64, num_layers=2, bidirectional=True, **kwargs)
    cudnn = copy.deepcopy(exact_module)
    x = torch.randn(30, 8, 48, dtype=torch.float64)
    exact = _run(exact_module, x.clone().requires_grad_())
    ours = ours.to("cuda", dtype)
    cudnn = cudnn.to("cuda", dtype)
    actual = _run(ours, x.to("cuda", dtype).requires_grad_())
    theirs = _run(cudnn, x.to("cuda", dtype).requires_grad_())
    for k, (a, t, e) in enumerate(zip(actual[0] + actual[1], theirs[0] + theirs[1], exact[0] + exact[1])):
        assert a.dtype == dtype
        error, torch_error = _relative_error(a, e), _relative_error(t, e)
        assert error <= max(3 * torch_error, bound), (k, error, torch_error)


@pytest.mark.parametrize("case", MODES, ids=_ids)
@pytest.mark.parametrize("packed", ["sorted", "unsorted"])
def test_packed_bidirectional_matches_cpu_float64(case, packed):
    """Packed sequences of different lengths, both directions, float64 on the GPU against the CPU."""
    mode, kwargs = case
    _, cpu = twins(mode, 5, 32, num_layers=2, bidirectional=True, **kwargs)
    gpu = copy.deepcopy(cpu).cuda()
    lengths = torch.tensor([7, 3, 9, 1, 5])
    x = torch.randn(9, 5, 5, dtype=torch.float64)
    results = []
    for module, device in ((cpu, "cpu"), (gpu, "cuda")):
        leaf = x.to(device).requires_grad_()
        packed_input = pack_padded_sequence(leaf, lengths, enforce_sorted=packed == "sorted")
        out, states = flat_outputs(module(packed_input))
        grads = torch.autograd.grad(weighted_sum([out] + states), [leaf] + list(module.parameters()))
        results.append([out, *states, *grads])
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a.cpu(), e, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("case", MODES, ids=_ids)
def test_gradients_are_deterministic(case):
    """Same inputs, bit-identical gradients: the kernels use no atomics."""
    mode, kwargs = case
    _, module = twins(mode, 64, 128, num_layers=2, dtype=torch.float32, device="cuda", **kwargs)
    x = torch.randn(50, 16, 64, device="cuda")
    first = _run(module, x.clone().requires_grad_())
    for _ in range(3):
        again = _run(module, x.clone().requires_grad_())
        for a, b in zip(first[0] + first[1], again[0] + again[1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("case", MODES, ids=_ids)
def test_training_step_captured_in_a_cuda_graph(case):
    """Forward and backward replay from a CUDA graph with the eager results: no host synchronisation or
    allocation inside the kernels' loops."""
    mode, kwargs = case
    _, module = twins(mode, 16, 32, num_layers=2, dtype=torch.float32, device="cuda", **kwargs)
    static_x = torch.randn(20, 4, 16, device="cuda", requires_grad=True)

    def step():
        out, _ = module(static_x)
        out.square().sum().backward()
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph (cuBLAS workspaces, allocator)
            module.zero_grad(set_to_none=False)
            static_x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    module.zero_grad(set_to_none=False)
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_out = step()

    new_x = torch.randn_like(static_x)
    static_x.data.copy_(new_x)
    for p in module.parameters():
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    expected_x = new_x.clone().requires_grad_()
    expected_out, _ = module(expected_x)
    expected_grads = torch.autograd.grad(expected_out.square().sum(), [expected_x] + list(module.parameters()))
    torch.testing.assert_close(static_out, expected_out)
    for a, e in zip([static_x.grad] + [p.grad for p in module.parameters()], expected_grads):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_training_on_cuda(mode, dtype):
    """Under torch.autocast("cuda") the layers run in the autocast dtype, as torch.nn's do, and float32
    parameters get float32 gradients close to torch.nn's under the same autocast."""
    reference, ours = twins(mode, 16, 32, num_layers=2, dtype=torch.float32, device="cuda")
    x = torch.randn(25, 4, 16, device="cuda")
    results = []
    for module in (reference, ours):
        with torch.autocast("cuda", dtype=dtype):
            out, _ = module(x)
        results.append((out, torch.autograd.grad(out.float().square().sum(), list(module.parameters()))))
    (expected, expected_grads), (actual, grads) = results
    assert actual.dtype == expected.dtype == dtype
    torch.testing.assert_close(actual.float(), expected.float(), atol=3e-2, rtol=3e-2)
    for g, e in zip(grads, expected_grads):
        assert g.dtype == torch.float32
        assert _relative_error(g, e.double().cpu()) < 5e-2


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_large_batch_and_hidden(mode):
    """B=512, H=1024 (many row blocks and unit tiles, a ragged last tile), against cuDNN in float32."""
    reference, ours = twins(mode, 64, 1000, dtype=torch.float32, device="cuda")
    x = torch.randn(6, 512, 64, device="cuda", requires_grad=True)
    expected = _run(reference, x)
    actual = _run(ours, x)
    for a, e in zip(actual[0] + actual[1], expected[0] + expected[1]):
        torch.testing.assert_close(a, e, atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_indices_past_two_to_the_31(mode):
    """T*B*G*H > 2^31: the input projection and saved activations are indexed with 64 bits. Rows are
    independent, so the first rows of the big batch must equal a small batch of the same rows."""
    gates = 4 if mode == "LSTM" else 3
    T, B, H = 4, (2**31 // (4 * gates * 256)) + 64, 256  # T*B*G*H just past 2^31
    assert T * B * gates * H > 2**31
    module = getattr(gatedrnn, mode)(8, H).to("cuda", torch.bfloat16)
    x = torch.randn(T, B, 8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out, _ = module(x)
        rows = torch.cat([x[:, :2], x[:, -2:]], dim=1)
        expected, _ = module(rows)
    torch.testing.assert_close(torch.cat([out[:, :2], out[:, -2:]], dim=1), expected)
