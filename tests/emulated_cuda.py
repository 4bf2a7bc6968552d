"""The CUDA sources' CPU emulation as a test library (torch.ops.gatedrnn_emulated): how to build and load it,
plain or under a sanitizer, and the op arguments and calls the emulation tests share (test_cuda_emulated.py,
test_cuda_races.py). See csrc/cuda/emulation.h for what the emulation is.

GATEDRNN_EMULATION_SANITIZER selects the build: unset (plain), `address` (AddressSanitizer and
UndefinedBehaviorSanitizer, every report fatal) or `thread` (ThreadSanitizer, the race detector). The
ThreadSanitizer runtime must be the first library of the process, so a `thread` run starts Python with
LD_PRELOAD=$(gcc -print-file-name=libtsan.so) (.ci/sanitize does; so does test_cuda_races.py for its
subprocesses)."""
import os
import pathlib
import subprocess

import torch
from torch.utils.cpp_extension import load

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "tests" / "cuda_emulation" / name
           for name in ("library.cpp", "lstm.cpp", "gru.cpp", "gru_reset_before.cpp", "layer_norm.cpp")]
T, I = 6, 5

_SANITIZER_FLAGS = {
    None: [],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread", "-fno-omit-frame-pointer"],
}


def sanitizer():
    """The sanitizer this process's emulation tests use (GATEDRNN_EMULATION_SANITIZER), checked."""
    name = os.environ.get("GATEDRNN_EMULATION_SANITIZER") or None
    if name not in _SANITIZER_FLAGS:
        raise ValueError(f"GATEDRNN_EMULATION_SANITIZER={name!r}: expected 'address' or 'thread' (or unset)")
    return name


def tsan_runtime():
    """The ThreadSanitizer runtime of the host compiler, or None when it has none."""
    try:
        path = subprocess.run(["gcc", "-print-file-name=libtsan.so"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


def tsan_is_loaded():
    with open("/proc/self/maps") as maps:
        return "libtsan" in maps.read()


def load_library(sanitizer_name=None):
    """Builds (once; later calls reuse the build) and loads the emulation library; returns its path."""
    flags = _SANITIZER_FLAGS[sanitizer_name]
    name = "gatedrnn_emulated" + (f"_{sanitizer_name}" if sanitizer_name else "")
    if sanitizer_name == "thread" and not tsan_is_loaded():
        raise RuntimeError("the ThreadSanitizer build needs the runtime loaded first: run Python with "
                           "LD_PRELOAD=$(gcc -print-file-name=libtsan.so)")
    # The compiler must not run under the sanitizer's runtime (shell scripts such as pyenv's shims crash
    # under ThreadSanitizer): the preload applies to this process only, whose runtime is already loaded.
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        optimise = ["-O1", "-g"] if sanitizer_name else ["-O1", "-g0"]
        # std::barrier (emulation.h) is C++20; torch 2.11 and older build extensions as C++17.
        optimise.append("-std=c++20")
        load(name, [str(s) for s in SOURCES], extra_cflags=optimise + ["-Wno-unused-parameter"] + flags,
             extra_ldflags=flags, is_python_module=False)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    return os.path.join(torch.utils.cpp_extension._get_build_directory(name, False), name + ".so")


def batch_sizes_for(lengths):
    return torch.tensor([sum(1 for n in lengths if n > t) for t in range(max(lengths))], dtype=torch.int64)


def make_args(mode, batch, hidden, packed, bias, proj, dtype, seed=0):
    """Arguments of the forward op (without reverse and save_for_backward), in float64 then cast."""
    g = torch.Generator().manual_seed(seed)
    gates = 4 if mode == "LSTM" else 3
    state = proj or hidden

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    if packed:
        lengths = sorted([T] + [1 + (3 * k) % T for k in range(1, batch)], reverse=True)
        batch_sizes = batch_sizes_for(lengths)
        x = randn(int(batch_sizes.sum()), I)
    else:
        batch_sizes, x = None, randn(T, batch, I)
    h0 = randn(batch, state)
    w_ih, w_hh = randn(gates * hidden, I, scale=0.5), randn(gates * hidden, state, scale=0.3)
    b_ih, b_hh = (randn(gates * hidden), randn(gates * hidden)) if bias else (None, None)
    if mode == "GRU":
        return [x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh]
    w_hr = randn(proj, hidden, scale=0.3) if proj else None
    return [x, batch_sizes, h0, randn(batch, hidden), w_ih, w_hh, b_ih, b_hh, w_hr]


def run_forward_backward(ops, mode, args, reverse, mask=(True, True, True), seed=1, **options):
    """Forward outputs and backward gradients of one op library. options: the ops' optional arguments by name
    (lengths, zoneout, zoneout_cell, weight_hh_mask), the same for the forward and the backward."""
    if mode == "LSTM":
        x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = args
        out, hy, cy, gates, cells = ops.lstm_forward(*args, reverse, True, **options)
        g = torch.Generator().manual_seed(seed)
        grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (out, hy, cy)]
        backward = ops.lstm_backward(*grads, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cells, reverse,
                                     list(mask), **options)
        return [out, hy, cy, gates, cells], list(backward)
    x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh = args
    out, hy, saved = ops.gru_forward(*args, reverse, True, **options)
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (out, hy)]
    backward = ops.gru_backward(*grads, x, batch_sizes, h0, w_ih, w_hh, out, saved, reverse, list(mask), **options)
    return [out, hy, saved], list(backward)
