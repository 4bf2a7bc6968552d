"""The benchmark cases: which shapes, layer configurations, modes and dtypes are measured."""
from dataclasses import dataclass

import torch

from .variants import VARIANTS


@dataclass(frozen=True)
class Case:
    mode: str  # "LSTM" or "GRU"
    T: int
    B: int
    I: int
    H: int
    training: bool  # forward + backward, else inference under no_grad
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False  # variable lengths, uniform in [min_length, T], as a PackedSequence
    dtype: torch.dtype = torch.float32
    min_length: int = 30
    variant: str = ""  # a layer beyond torch.nn (benchmarks/variants.py), timed against a torch.nn cell loop
    cell: bool = False  # T calls of LSTMCell/GRUCell in a Python loop (a decoder's way), on both sides

    @property
    def name(self):
        """The module class each side runs: LSTM or GRU, or LSTMCell or GRUCell for a cell case."""
        return f"{self.mode}Cell" if self.cell else self.mode

    @property
    def directions(self):
        return 2 if self.bidirectional else 1

    def label(self):
        parts = [self.name, "train" if self.training else "infer", f"T={self.T} B={self.B} I={self.I} H={self.H}"]
        if self.layers > 1 or self.bidirectional:
            parts.append(f"L={self.layers}{' bi' if self.bidirectional else ''}")
        if self.packed:
            parts.append(f"packed {self.min_length}..{self.T}")
        if self.dtype != torch.float32:
            parts.append(str(self.dtype).replace("torch.", ""))
        if self.variant:
            parts.append(self.variant)
        return " ".join(parts)

    def slug(self):
        """The label as an identifier (for test ids and -k selections)."""
        parts = [self.name, "train" if self.training else "infer", f"T{self.T}-B{self.B}-I{self.I}-H{self.H}"]
        if self.layers > 1 or self.bidirectional:
            parts.append(f"L{self.layers}{'bi' if self.bidirectional else ''}")
        if self.packed:
            parts.append("packed")
        if self.dtype != torch.float32:
            parts.append(str(self.dtype).replace("torch.", ""))
        if self.variant:
            parts.append(self.variant)
        return "-".join(parts)

    @property
    def baseline(self):
        """What gatedrnn's speed-up is measured against: torch.nn's layer, or for a variant torch.nn has no
        layer for, a Python loop over torch.nn's cell (benchmarks/variants.py)."""
        return "torch.nn loop" if self.variant else "torch.nn"

    def lengths(self):
        """Sequence lengths of a packed case: uniform in [min_length, T], fixed by a seed."""
        if not self.packed:
            return [self.T] * self.B
        g = torch.Generator().manual_seed(1234)
        return torch.randint(self.min_length, self.T + 1, (self.B,), generator=g).tolist()

    def gemm_flops(self):
        """Floating-point operations of the GEMMs (the pointwise math is negligible beside them): per layer
        and direction 2*rows*gates*H*(input size + state size); backward does twice the forward's work."""
        gates = {"LSTM": 4, "GRU": 3}[self.mode] * self.H
        rows = sum(self.lengths())
        total = 0
        for layer in range(self.layers):
            layer_input = self.I if layer == 0 else self.H * self.directions
            total += self.directions * 2 * rows * gates * (layer_input + self.H)
        return total * (3 if self.training else 1)


# (T, B, I, H): the field's customary default (PyTorch's fastrnns), latency, and two mid-size shapes.
STANDARD_SHAPES = [(100, 64, 512, 512), (50, 1, 128, 128), (100, 64, 256, 256), (200, 32, 128, 256)]
# (T, B, I, H) of the cell cases: T single steps, as a decoder with attention or beam search calls a cell.
CELL_SHAPES = [(50, 1, 128, 128), (50, 16, 256, 256)]
LARGE_SHAPE = (100, 64, 1024, 1024)


def bf16_cpu():
    """The CPU has AVX512_BF16 and gatedrnn uses it (GATEDRNN_CPU_ISA does not cap it)."""
    import gatedrnn

    return gatedrnn.backend_info()["cpu_bf16_tiles"]


def standard_cases(device, full=False):
    """Every case for one device: each shape, a 2-layer bidirectional and a packed variable-length case, for
    LSTM and GRU, inference and training; float32, and bfloat16/float16 on GPU; on CPUs with AVX512_BF16 also
    bfloat16 inference at T=100 B=64 I=H=512."""
    shapes = STANDARD_SHAPES + ([LARGE_SHAPE] if full or device == "cuda" else [])
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device == "cuda" else [])
    cases = []
    if device == "cpu" and bf16_cpu():
        # bfloat16 inference where the CPU computes in it (AVX512_BF16), against torch.nn's bfloat16 (oneDNN).
        cases += [Case(mode, *STANDARD_SHAPES[0], False, dtype=torch.bfloat16) for mode in ("LSTM", "GRU")]
    for dtype in dtypes:
        for mode in ("LSTM", "GRU"):
            for training in (False, True):
                for T, B, I, H in shapes:
                    cases.append(Case(mode, T, B, I, H, training, dtype=dtype))
                cases.append(Case(mode, 100, 64, 256, 256, training, layers=2, bidirectional=True, dtype=dtype))
                cases.append(Case(mode, 100, 64, 256, 256, training, packed=True, dtype=dtype))
    cases += [Case(mode, *shape, training, cell=True)
              for mode in ("LSTM", "GRU") for training in (False, True) for shape in CELL_SHAPES]
    # The variants, in training, against a per-step loop over torch.nn's cell (and gatedrnn's plain layer).
    cases += [Case(mode, 100, 64, 256, 256, True, variant=variant)
              for variant, modes in VARIANTS.items() for mode in modes]
    return cases
