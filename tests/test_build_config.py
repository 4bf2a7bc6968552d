"""setup.py's build decisions: CUDA by torch's build and a CUDA root (never by torch.cuda.is_available()),
forced by GATEDRNN_CUDA, and the real CUDA root rather than the directory of a wrapper script."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import gatedrnn

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def setup_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("gatedrnn_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the functions; the build itself runs only as __main__
    return module


def test_forced_off(setup_module, monkeypatch):
    monkeypatch.setenv("GATEDRNN_CUDA", "0")
    assert setup_module.want_cuda()[0] is False


def test_automatic_choice_follows_torch_build_and_cuda_root(setup_module, monkeypatch):
    monkeypatch.delenv("GATEDRNN_CUDA", raising=False)
    with_cuda, root = setup_module.want_cuda()
    assert with_cuda == (torch.version.cuda is not None and root is not None)
    if root is not None:
        assert os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isdir(os.path.join(root, "lib64"))


def test_forced_on_needs_cuda_torch_and_root(setup_module, monkeypatch):
    monkeypatch.setenv("GATEDRNN_CUDA", "1")
    if torch.version.cuda is None or setup_module.find_cuda_root() is None:
        with pytest.raises(RuntimeError, match="GATEDRNN_CUDA=1"):
            setup_module.want_cuda()
    else:
        assert setup_module.want_cuda()[0] is True


def test_installed_build_matches_the_decision(setup_module, monkeypatch):
    """The extension under test was built the way setup.py decides by default on this machine."""
    if "GATEDRNN_CUDA" in os.environ:
        pytest.skip("GATEDRNN_CUDA is set: the build may have been forced")
    assert gatedrnn.backend_info()["cuda_compiled"] == setup_module.want_cuda()[0]


@pytest.fixture(scope="module")
def kernel_resources():
    """One run of .ci/kernel_resources.py --markdown (the check and the README table) on the installed build."""
    if not gatedrnn.backend_info()["cuda_compiled"]:
        pytest.skip("gatedrnn was built without CUDA code")
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "kernel_resources.py"), "--markdown"],
                          capture_output=True, text=True)


def test_cuda_kernels_use_no_stack_or_local_memory(kernel_resources):
    """The static resource check of .ci/kernel_resources.py on the installed build: every gatedrnn kernel is
    present for every architecture, with no stack frame and no local memory (no register spills)."""
    result = kernel_resources
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no stack frames, no local memory, none missing" in result.stdout
    for arch in ("sm_80", "sm_86", "sm_90"):
        if arch[3:] in gatedrnn.backend_info()["cuda_archs"].replace(".", ""):
            assert f"{arch} " in result.stdout, arch


def test_readme_states_the_compiled_kernel_resources(kernel_resources):
    """The README's per-kernel registers/shared memory table is the one this build produces (nvcc 13.0,
    the toolkit CI builds with). Regenerate it with `python .ci/kernel_resources.py --markdown`."""
    info = gatedrnn.backend_info()
    if info["cuda_runtime"] != 13000 or info["cuda_archs"] != "8.0;8.6;9.0+PTX":
        pytest.skip("the README's table is for a CUDA 13.0 build for 8.0;8.6;9.0+PTX")
    assert kernel_resources.returncode == 0, kernel_resources.stderr[-3000:]
    table = [line for line in kernel_resources.stdout.splitlines() if line.startswith("|")]
    readme = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    start = readme.index(table[0])
    assert readme[start:start + len(table)] == table


def _sass(*opcodes, arch="sm_90", name="_ZN8gatedrnn4cuda17lstm_forward_stepIfLi4EEEvv"):
    lines = [f"\tarch = {arch}", f"\t\tFunction : {name}"]
    lines += [f"        /*{16 * k:04x}*/                   {op} ;   /* 0x0000 */" for k, op in enumerate(opcodes)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def kernel_resources_module():
    spec = importlib.util.spec_from_file_location("kernel_resources", ROOT / ".ci" / "kernel_resources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_staging_check_counts_global_loads_issued_after_a_shared_store(kernel_resources_module):
    """.ci/kernel_resources.py's SASS check (run on the real build above), on hand-written SASS: a staging
    loop that alternates loads and stores is counted, one that loads everything first is not, and a barrier
    starts a new interval."""
    count = kernel_resources_module.loads_after_shared_stores
    alternating = _sass("LDG.E R1, desc[UR4][R2.64]", "STS [R3], R1", "LDG.E R5, desc[UR4][R2.64+0x400]",
                        "STS [R3+0x400], R5", "@!P0 LD.E R7, desc[UR4][R8.64]", "STS [R9], R7",
                        "BAR.SYNC.DEFER_BLOCKING 0x0")
    batched = _sass("LDG.E.128.CONSTANT R4, desc[UR4][R2.64]", "@P1 LDG.E R8, desc[UR4][R10.64]", "STS.128 [R3], R4",
                    "STS [R12], R8", "BAR.SYNC.DEFER_BLOCKING 0x0", "LDG.E R1, desc[UR4][R2.64+0x80]",
                    "STS [R3], R1", "BAR.SYNC.DEFER_BLOCKING 0x0")
    name = "void gatedrnn::cuda::lstm_forward_step<float, 4>()"
    assert count(alternating) == {("sm_90", name): 2}
    assert count(batched) == {("sm_90", name): 0}
    assert count(_sass("STS [R3], R1", name="_ZN5other6kernelEv")) == {}  # not a gatedrnn step kernel
