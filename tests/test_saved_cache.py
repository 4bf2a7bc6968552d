"""The CPU cache of saved-activation buffers (csrc/cpu/saved_cache.h): a training call's saved tensors take
the buffers that the previous call's saved tensors left, so that they are not faulted in afresh every call;
what is kept is capped per process, and the buffers come back from any thread and at the interpreter's exit."""
import json
import os
import resource
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import gatedrnn

CAP = 256 * 2**20
PAGE = resource.getpagesize()
ops = torch.ops.gatedrnn


def lstm_training_forward(T, B=64, H=256, I=32, lengths=None):
    """The LSTM op with save_for_backward=True: (gates, cells), the saved tensors."""
    x = torch.randn(T, B, I)
    h, c = torch.randn(B, H), torch.randn(B, H)
    w_ih, w_hh = torch.randn(4 * H, I) / 16, torch.randn(4 * H, H) / 16
    out = ops.lstm_forward(x, None, h, c, w_ih, w_hh, None, None, None, False, True, lengths=lengths)
    return out[3], out[4]


@pytest.fixture(autouse=True)
def empty_cache():
    """Each test starts with nothing kept (other tests' buffers would otherwise be reused or evicted)."""
    gatedrnn._extension.empty_saved_cache()
    assert idle() == 0


def idle():
    return gatedrnn._extension.saved_cache_bytes()


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_the_next_call_takes_the_buffers_the_last_call_left():
    """Saved tensors that die return their buffers (the idle bytes grow by exactly theirs); the next call of
    the same shape takes them back, and the idle bytes drop by as much."""
    saved = lstm_training_forward(T=53)
    nbytes = sum(t.numel() * t.element_size() for t in saved)
    assert all(t.numel() * t.element_size() >= 2**20 for t in saved)
    del saved
    assert idle() == nbytes
    saved = lstm_training_forward(T=53)
    assert idle() == 0
    del saved
    assert idle() == nbytes


FAULTS = textwrap.dedent("""
    import json, resource, torch, gatedrnn, test_saved_cache as t
    def faults_of_a_call():
        faults = t.minor_faults()
        saved = t.lstm_training_forward(T=100, H=512)
        return t.minor_faults() - faults, saved
    faults_of_a_call()  # warm-up: this thread's scratch, the heap
    gatedrnn._extension.empty_saved_cache()
    fresh, saved = faults_of_a_call()
    nbytes = sum(x.numel() * x.element_size() for x in saved)
    del saved
    reused, saved = faults_of_a_call()
    print(json.dumps({"fresh": fresh, "reused": reused, "pages": nbytes // t.PAGE}))
""")


def test_a_reused_buffer_is_not_faulted_in_again():
    """What the cache is for: in a fresh process (glibc's defaults: a new mapping for each allocation over
    32 MiB; a long-lived process may have raised that threshold), a call writes its 65 MB of saved rows into
    fresh buffers with one page fault per 4 KiB page, and into the buffers the last call left without."""
    result = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["fresh"] - counts["reused"] >= 0.8 * counts["pages"], counts


def test_a_reused_buffer_still_has_zeros_in_the_rows_no_step_writes():
    """With lengths the saved tensors keep T * B rows, the packed ones first; the rest are zero, also when the
    buffer comes back dirty from a call that wrote every row."""
    T, B = 61, 64
    dirty = lstm_training_forward(T=T, B=B)
    for t in dirty:
        t.fill_(7.0)
    del dirty
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    rows = int(lengths.sum())
    taken = idle()
    gates, cells = lstm_training_forward(T=T, B=B, lengths=lengths)
    assert idle() < taken  # the dirty buffers were reused
    assert gates.shape[0] == cells.shape[0] == T * B
    assert not gates[rows:].any() and not cells[rows:].any()
    assert (gates[:rows] != 7.0).all()  # every packed row was written by a step


def test_what_is_kept_stays_within_the_cap_for_the_process():
    """Saved tensors of many sizes die, 620 MB together: the cache keeps at most 256 MiB, the buffers that
    came back last (the oldest give way); one buffer larger than the cap is not kept at all."""
    kept = [lstm_training_forward(T=40 + 7 * k, H=512) for k in range(12)]  # 26 to 77 MB of saved rows each
    while kept:
        newest = sum(t.numel() * t.element_size() for t in kept.pop())
        assert 0 < idle() <= CAP
        assert idle() >= newest  # what came back last is kept
    gatedrnn._extension.empty_saved_cache()
    gates, cells = lstm_training_forward(T=400, H=1024, I=8)  # gates: 420 MB, cells: 105 MB
    del gates
    assert idle() == 0
    del cells
    assert idle() == 400 * 64 * 1024 * 4  # the cells' buffer, float32


def test_buffers_come_back_from_the_thread_that_frees_them():
    """autograd frees saved tensors on its own threads: a buffer freed on another thread is kept as well."""
    saved = list(lstm_training_forward(T=67))
    nbytes = sum(t.numel() * t.element_size() for t in saved)
    before = idle()
    worker = threading.Thread(target=saved.clear)
    worker.start()
    worker.join()
    assert idle() == before + nbytes


def test_saved_tensors_alive_at_exit_are_freed_without_a_crash():
    """The cache outlives every tensor: a training graph still alive when the interpreter exits (its saved
    buffers freed during the teardown, after C++ statics) exits cleanly."""
    script = textwrap.dedent("""
        import torch, gatedrnn
        model = gatedrnn.LSTM(64, 256, layer_norm=True)
        x = torch.randn(50, 64, 64)
        model(x)[0].sum().backward()  # buffers in the cache
        kept = model(x)[0]             # and a graph holding some at exit
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
