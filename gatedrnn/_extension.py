"""Loads the compiled extension, loudly: gatedrnn has no silent pure-Python fallback."""
import torch  # noqa: F401  (must be imported before the extension's shared library is loaded)

try:
    from . import _C
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "gatedrnn's compiled extension (gatedrnn._C) could not be loaded: "
        f"{error}.\nBuild it from the repository root with:\n"
        "    pip install --no-build-isolation -e .\n"
        "(torch must be installed first; a CUDA build of torch also builds the CUDA sources). "
        "gatedrnn does not fall back to a slow Python implementation."
    ) from error

# Every op the package calls; a build that lacks one is as broken as a missing library.
OPS = ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward")


def backend_info():
    """What the extension was built with and which devices have fused kernels registered.

    Returns a dict: ``cpu`` (True when every op has a CPU kernel), ``cuda`` (True when every op has a CUDA kernel),
    ``cuda_compiled`` (the CUDA sources were built), ``cuda_archs`` (the TORCH_CUDA_ARCH_LIST they were built for),
    ``cuda_runtime`` (CUDA runtime version, e.g. 13000, or 0), ``cpu_isa`` (which compiled variant of the fused CPU
    tile kernels runs: "avx512", "avx2" or "baseline"; GATEDRNN_CPU_ISA caps it), ``cpu_threads`` ("openmp": a team
    of torch's OpenMP threads runs each time loop; "single"), ``cpu_team_size`` (threads in a team started now from
    this thread), ``cpu_team_barrier`` (the barrier between a step's phases in such a team: "gatedrnn", its own
    spinning one, where the team has a CPU per thread; "openmp", libgomp's, where it has more threads than the CPUs
    the process may use; "none" for a team of one), ``cpu_gemm`` (the GEMM of the large products after a backward
    loop: "tiles", gatedrnn's own, or "aten", torch.mm; the faster on this machine, timed once per process, or as
    GATEDRNN_CPU_GEMM=tiles|aten forces), ``cpu_bf16_tiles`` (True where bfloat16 inference runs its products in
    bfloat16 with float32 accumulation: CPUs with AVX512_BF16; elsewhere bfloat16 is computed in float32),
    ``cpu_bf16_amx`` (True where those bfloat16 products run on the AMX tile unit: Intel CPUs with AMX-BF16, unless
    GATEDRNN_CPU_AMX=0), ``library`` (path of the shared library) and ``torch`` (the torch version running).
    """
    build = _C.build_info()

    def has_kernels(dispatch_key):
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"gatedrnn::{op}", dispatch_key) for op in OPS)

    return {
        "cpu": has_kernels("CPU"),
        "cuda": has_kernels("CUDA"),
        "cuda_compiled": build["cuda"],
        "cuda_archs": build["cuda_archs"],
        "cuda_runtime": build["cuda_runtime"],
        "cpu_isa": build["cpu_isa"],
        "cpu_threads": build["cpu_threads"],
        "cpu_team_size": build["cpu_team_size"],
        "cpu_team_barrier": build["cpu_team_barrier"],
        "cpu_gemm": build["cpu_gemm"],
        "cpu_bf16_tiles": build["cpu_bf16_tiles"],
        "cpu_bf16_amx": build["cpu_bf16_amx"],
        "library": _C.__file__,
        "torch": torch.__version__,
    }


def kernel_calls():
    """How often each CPU tile kernel has run in this process: {label: calls}, where one call is one thread's
    share of one step (or of one chunk's input projection, or one post-loop product). Labels:
    lstm_forward_step, lstm_backward_step, lstm_input_projection, lstm_projection, lstm_backward_projection,
    gru_forward_step, gru_backward_step, gru_input_projection, the reset_after=False GRU's
    gru_reset_before_gates_step, gru_reset_before_candidate_step, gru_reset_before_backward_step,
    gru_reset_before_reset_backward_step, gru_reset_before_input_projection, matmul, and the bfloat16 tiles'
    lstm_forward_step_bf16, lstm_input_projection_bf16, gru_forward_step_bf16, gru_input_projection_bf16, of
    which bf16_amx_products counts the calls that ran on AMX (cpu_bf16_amx in backend_info()). The tests read it
    to prove the fused step kernels ran."""
    return dict(_C.kernel_calls())


def scratch_bytes():
    """Bytes that the CPU ops' per-thread scratch buffers hold now, all threads together: at most 256 MiB
    per process (csrc/cpu/workspace.h), whatever the number of threads or the sequence length."""
    return _C.scratch_bytes()


def saved_cache_bytes():
    """Bytes of saved-activation buffers (what a CPU training call keeps for its backward) that died and are
    kept for the next call instead of being unmapped: at most 256 MiB per process (csrc/cpu/saved_cache.h)."""
    return _C.saved_cache_bytes()


def empty_saved_cache():
    """Frees the saved-activation buffers that saved_cache_bytes() counts (those in use stay), as
    torch.cuda.empty_cache() does for CUDA's caching allocator."""
    _C.empty_saved_cache()
