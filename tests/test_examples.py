"""Every script in examples/ runs end to end at its tiny size: it trains with gatedrnn's layers and torch.nn's
side by side, prints both times per epoch, and writes its PNG."""
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = sorted(p for p in (pathlib.Path(__file__).resolve().parent.parent / "examples").glob("*.py")
                  if p.name != "common.py")


def test_the_five_classic_tasks_are_there():
    assert {p.stem for p in EXAMPLES} == {"sine_forecasting", "copy_task", "long_range_classification",
                                          "stateful_tbptt", "gradient_flow"}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_and_writes_its_figure(script, tmp_path):
    pytest.importorskip("matplotlib", reason="the examples plot with matplotlib (pip install matplotlib)")
    result = subprocess.run([sys.executable, str(script), "--tiny", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"time per epoch: gatedrnn [\d.]+ s, torch\.nn [\d.]+ s", result.stdout), result.stdout[-2000:]
    png = tmp_path / f"{script.stem}.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
