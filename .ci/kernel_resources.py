"""Static resource check of gatedrnn's compiled CUDA kernels, without a GPU.

Reads the machine code in the built extension with cuobjdump (--dump-resource-usage) and, per kernel and
architecture, reports registers, shared memory, stack and local memory. Fails (exit 1) when any gatedrnn
kernel uses a stack frame or local memory (register spills; ptxas -warn-spills -Werror already fails the
build for spills, this also catches local arrays), or when a kernel is missing for an architecture.

It also reads the SASS (cuobjdump -sass) of every step kernel (the block-tile ones; layer_norm's row kernels
stage nothing) and checks how it stages operands in shared
memory (csrc/cuda/step_tile.cuh): between two barriers, no global load may come after a shared-memory
store. A load issued after a store waits for it, so a staging loop that alternates loads and stores costs
one L2 round trip per pair instead of one per chunk (the form this replaced had 13 such loads per kernel).

    python .ci/kernel_resources.py [LIBRARY] [--markdown]

LIBRARY defaults to the installed gatedrnn._C. --markdown prints the README's table. cuobjdump is not in
/usr/local/cuda here; the triton wheel that comes with torch carries one (BUILD-NOTES.md).
"""
import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys

# The step kernels: block tiles (step_tile.cuh), instantiated per dtype and rows per thread.
KERNELS = ("lstm_forward_step", "lstm_backward_step", "gru_forward_step", "gru_backward_step", "gru_reset_gates_step",
           "gru_candidate_step", "gru_update_backward_step", "gru_reset_backward_step", "lstm_norm_product_step",
           "gru_norm_product_step", "lstm_norm_backward_product_step", "gru_norm_backward_product_step")
# The row kernels (layer_norm.cu: one block per batch row, no tile), instantiated per dtype only.
ROW_KERNELS = ("lstm_norm_rows", "lstm_norm_grad_rows", "gru_norm_rows", "gru_norm_grad_rows")
DTYPES = {"float": "float32", "double": "float64", "c10::Half": "float16", "c10::BFloat16": "bfloat16"}
ROWS_PER_THREAD = (1, 2, 4)


def find_cuobjdump():
    found = shutil.which("cuobjdump") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                       "cuobjdump")
    if os.path.isfile(found):
        return found
    import triton  # noqa: F401  (only to locate its bundled CUDA tools)

    bundled = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    if not bundled:
        sys.exit("kernel_resources: no cuobjdump found (CUDA toolkit or triton wheel)")
    return bundled[0]


def demangle(names):
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def read_resources(library):
    """[(arch, demangled kernel name, {REG, STACK, SHARED, LOCAL})] for the gatedrnn kernels in library."""
    dump = subprocess.run([find_cuobjdump(), "--dump-resource-usage", library], capture_output=True, text=True,
                          check=True).stdout
    entries, arch, function = [], None, None
    for line in dump.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function and "REG:" in line:
            usage = {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            entries.append((arch, function, usage))
            function = None
    names = demangle([f for _, f, _ in entries]) if entries else []
    return [(arch, name, usage) for (arch, _, usage), name in zip(entries, names) if "gatedrnn" in name]


def parse_name(name):
    """('lstm_forward_step', 'float32', 4) from the demangled name of one template instance; a row kernel's
    rows per thread is None."""
    if m := re.search(r"(\w+_step)<([^,]+), (\d+)>", name):
        return m.group(1), DTYPES.get(m.group(2).strip(), m.group(2)), int(m.group(3))
    m = re.search(r"(\w+_rows)<([^,>]+)>", name)
    return m.group(1), DTYPES.get(m.group(2).strip(), m.group(2)), None


def expected_instances():
    """(kernel, dtype, rows per thread) of every kernel instance each architecture must have."""
    steps = [(k, d, r) for k in KERNELS for d in DTYPES.values() for r in ROWS_PER_THREAD]
    return steps + [(k, d, None) for k in ROW_KERNELS for d in DTYPES.values()]


def check(resources, archs):
    problems = []
    for arch, name, usage in resources:
        if usage.get("STACK", 0) or usage.get("LOCAL", 0):
            problems.append(f"{arch} {name}: STACK {usage.get('STACK')} LOCAL {usage.get('LOCAL')} (spills?)")
    present = {(arch, parse_name(name)) for arch, name, _ in resources}
    for arch in archs:
        for kernel, dtype, rpt in expected_instances():
            if (arch, (kernel, dtype, rpt)) not in present:
                problems.append(f"{arch}: {kernel}<{dtype}{'' if rpt is None else f', {rpt}'}> is missing")
    return problems


def loads_after_shared_stores(sass):
    """{(arch, demangled kernel name): number of global loads that follow a shared store before the next
    barrier} for the gatedrnn step kernels in cuobjdump -sass output (instructions in address order)."""
    counts, arch = {}, None
    names, bodies = [], []
    for part in re.split(r"\n(?=\s*(?:arch = sm_\d+|Function : ))", sass):
        if m := re.match(r"\s*arch = (sm_\d+)", part):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", part):
            if "_step" in m.group(1) and "gatedrnn" in m.group(1):
                names.append((arch, m.group(1)))
                bodies.append(part)
    for (arch, mangled), name, body in zip(names, demangle([n for _, n in names]) if names else [], bodies):
        late, stored = 0, False
        for instruction in re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", body):
            opcode = instruction.split()[1] if instruction.startswith("@") else instruction.split()[0]
            if opcode.startswith("BAR"):
                stored = False
            elif opcode.startswith("STS"):
                stored = True
            elif stored and opcode.startswith(("LDG", "LD.")):
                late += 1
        counts[(arch, name)] = late
    return counts


def read_staging(library):
    dump = subprocess.run([find_cuobjdump(), "-sass", library], capture_output=True, text=True, check=True).stdout
    return loads_after_shared_stores(dump)


def markdown(resources, archs):
    table = collections.defaultdict(dict)
    for arch, name, usage in resources:
        kernel, dtype, rpt = parse_name(name)
        table[(kernel, dtype)][(arch, rpt)] = usage
    header = ["kernel", "dtype"] + [f"registers {a}" for a in archs] + ["shared memory (bytes)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kernel in KERNELS + ROW_KERNELS:
        shapes = ROWS_PER_THREAD if kernel in KERNELS else (None,)  # a row kernel: one instance per dtype
        for dtype in DTYPES.values():
            row = table[(kernel, dtype)]
            cells = [f"`{kernel}`", dtype]
            for arch in archs:
                cells.append(" / ".join(str(row.get((arch, r), {}).get("REG", "?")) for r in shapes))
            cells.append(" / ".join(str(row.get((archs[0], r), {}).get("SHARED", "?")) for r in shapes))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", nargs="?")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    args = parser.parse_args()
    library = args.library
    if library is None:
        import gatedrnn

        info = gatedrnn.backend_info()
        if not info["cuda_compiled"]:
            sys.exit("kernel_resources: this gatedrnn build has no CUDA code")
        library = info["library"]
    resources = read_resources(library)
    archs = sorted({arch for arch, _, _ in resources})
    if not resources:
        sys.exit(f"kernel_resources: no gatedrnn kernels in {library}")
    if args.markdown:
        print(markdown(resources, archs))
    for arch, name, usage in resources:
        print(f"{arch} {name}: " + " ".join(f"{k}={v}" for k, v in usage.items()))
    problems = check(resources, archs)
    staging = read_staging(library)
    problems += [f"{arch} {name}: {n} global loads after a shared store in one barrier interval"
                 for (arch, name), n in staging.items() if n]
    step_images = sum(1 for _, name, _ in resources if parse_name(name)[2] is not None)
    if len(staging) != step_images:
        problems.append(f"SASS read for {len(staging)} step kernel images, resource usage for {step_images}")
    for problem in problems:
        print("PROBLEM:", problem, file=sys.stderr)
    print(f"kernel_resources: {len(resources)} kernel images for {', '.join(archs)}; "
          f"{'FAILED' if problems else 'no stack frames, no local memory, none missing'}; staging: "
          f"{'FAILED' if any(staging.values()) else 'every global load of a chunk before its first shared store'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
