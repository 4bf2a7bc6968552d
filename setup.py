"""Builds gatedrnn._C: the C++ CPU ops always, the CUDA sources when this is a CUDA build.

Install with `pip install --no-build-isolation -e .` so the extension is built against the torch that is
installed (build isolation would fetch another). See ../shared/BUILD-NOTES.md for the facts behind the
choices below.

Environment:
  GATEDRNN_CUDA=1 / 0     force the CUDA build on / off (default: on when torch is a CUDA build and a CUDA
                          root with nvcc is found; never decided by torch.cuda.is_available(), which is False
                          on our GPU-less build machines)
  TORCH_CUDA_ARCH_LIST    CUDA archs (default 8.0;8.6;9.0+PTX: without a visible GPU torch cannot guess;
                          the kernels need 8.0 or newer)
  GATEDRNN_DEBUG=1        -O0 -g
  GATEDRNN_SANITIZE=1     AddressSanitizer + UndefinedBehaviorSanitizer, every report fatal (see .ci/sanitize)
"""
import glob
import os
import shutil

from setuptools import setup

DEFAULT_ARCHS = "8.0;8.6;9.0+PTX"


def find_cuda_root():
    """The real CUDA root: /usr/local/bin/nvcc may be a wrapper script, which would make torch guess
    CUDA_HOME=/usr/local and fail to link cudart."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isdir(os.path.join(root, "lib64")):
            return root
    return None


def find_cuda_library_headers():
    """The directory holding cublas_v2.h, cusparse.h and cusolverDn.h, which ATen/cuda/CUDAContext.h includes.
    They are not in the nvcc toolkit at /usr/local/cuda but in the nvidia-* wheels torch depends on."""
    roots = []
    try:
        import nvidia

        roots = list(nvidia.__path__)
    except ImportError:
        pass
    cuda_root = find_cuda_root()
    candidates = [os.path.join(cuda_root, "include")] if cuda_root else []
    for root in roots:
        candidates += sorted(glob.glob(os.path.join(root, "*", "include")))
    for directory in candidates:
        if all(os.path.isfile(os.path.join(directory, h)) for h in ("cublas_v2.h", "cusparse.h", "cusolverDn.h")):
            return directory
    return None


def want_cuda():
    forced = os.environ.get("GATEDRNN_CUDA")
    import torch  # noqa: F401  (only to read the build facts, before cpp_extension is imported)

    torch_has_cuda = torch.version.cuda is not None
    root = find_cuda_root()
    if forced == "0":
        return False, root
    if forced == "1":
        if not torch_has_cuda:
            raise RuntimeError("GATEDRNN_CUDA=1 but this torch is a CPU build; install a CUDA build of torch")
        if root is None:
            raise RuntimeError("GATEDRNN_CUDA=1 but no CUDA root with bin/nvcc was found; set CUDA_HOME")
        return True, root
    return torch_has_cuda and root is not None, root


def main():
    with_cuda, cuda_root = want_cuda()
    if with_cuda:
        # cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_root
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("GATEDRNN_DEBUG") == "1"
    # -g0: Python's flags carry -g, which costs ~25 s per file and a 24x larger .so.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # torch chooses the C++ standard (C++20). -fno-trapping-math and -fno-math-errno (as torch itself is
    # built) let GCC vectorise the fused CPU loops, whose selects it otherwise will not if-convert.
    cxx_flags = opt + ["-Wall", "-Wno-unused-parameter", "-fno-trapping-math", "-fno-math-errno"]
    # The CPU tile kernels (csrc/cpu/tiles.h): GCC vector types whose `acc += a * w` must be one FMA
    # (-ffp-contract=fast; ISO C++ mode turns contraction off), compiled per instruction set (-Wno-psabi: GCC
    # notes that AVX-512 vector types change the ABI, which no function of ours passes them across), run by a
    # team of torch's OpenMP threads (-fopenmp links libgomp.so.1, which resolves to the one torch loaded).
    cxx_flags += ["-ffp-contract=fast", "-Wno-psabi", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if os.environ.get("GATEDRNN_SANITIZE") == "1":
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        cxx_flags = ["-O1", "-g"] + sanitize + cxx_flags[2:]
        link_flags += sanitize
    sources = ["csrc/gatedrnn.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    define_macros = []

    if with_cuda:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros += [("GATEDRNN_WITH_CUDA", None), ("GATEDRNN_CUDA_ARCHS", f'"{archs}"')]
        nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
        # Fail the build when a kernel spills registers or uses local memory (checked statically by ptxas).
        nvcc_flags += ["-Xptxas=-warn-spills,-warn-lmem-usage,-Werror", "--expt-relaxed-constexpr"]
        library_headers = find_cuda_library_headers()
        if library_headers is None:
            raise RuntimeError("CUDA build: cublas_v2.h/cusparse.h/cusolverDn.h not found in the CUDA root or the "
                               "nvidia-* wheels; install a CUDA build of torch (pip install torch)")
        # -isystem, after every -I: the toolkit's own headers keep precedence over the wheels' copies.
        nvcc_flags += ["-isystem", library_headers]
        ext = CUDAExtension("gatedrnn._C", sources, define_macros=define_macros, extra_link_args=link_flags,
                            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
    else:
        ext = CppExtension("gatedrnn._C", sources, define_macros=define_macros, extra_link_args=link_flags,
                           extra_compile_args={"cxx": cxx_flags})

    # Name, version and packages live in pyproject.toml.
    setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})


if __name__ == "__main__":
    main()
