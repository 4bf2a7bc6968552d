"""pytest benchmarks/: needs pytest-benchmark (pip install pytest-benchmark)."""
import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmark suite needs pytest-benchmark")
