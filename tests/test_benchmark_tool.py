"""The benchmark tool itself (python -m benchmarks): it runs, reports disagreement instead of timing it, and
writes its JSON and chart. Speed is never asserted here; that is the benchmark's job, not a unit test's."""
import json

import pytest
import torch

import gatedrnn

from benchmarks import __main__ as cli
from benchmarks import measure, report
from benchmarks.cases import Case, standard_cases


def test_standard_cases_cover_the_issue():
    cases = standard_cases("cpu")
    labels = {c.label() for c in cases}
    for mode in ("LSTM", "GRU"):
        for kind in ("infer", "train"):
            for shape in ("T=100 B=64 I=512 H=512", "T=50 B=1 I=128 H=128", "T=100 B=64 I=256 H=256",
                          "T=200 B=32 I=128 H=256"):
                assert f"{mode} {kind} {shape}" in labels
    for mode in ("LSTMCell", "GRUCell"):
        for kind in ("infer", "train"):
            assert f"{mode} {kind} T=50 B=1 I=128 H=128" in labels
    assert any(c.layers == 2 and c.bidirectional for c in cases)
    packed = [c for c in cases if c.packed]
    assert packed and all(30 <= n <= 100 for n in packed[0].lengths())
    assert not any(c.H == 1024 for c in cases)
    assert any(c.H == 1024 for c in standard_cases("cpu", full=True))
    assert {c.dtype for c in standard_cases("cuda")} == {torch.float32, torch.bfloat16, torch.float16}
    bf16 = {c.label() for c in cases if c.dtype == torch.bfloat16}
    if gatedrnn.backend_info()["cpu_bf16_tiles"]:
        assert bf16 == {f"{m} infer T=100 B=64 I=512 H=512 bfloat16" for m in ("LSTM", "GRU")}
    else:
        assert not bf16


def test_gemm_flops():
    case = Case("LSTM", 10, 2, 3, 4, training=False)
    assert case.gemm_flops() == 2 * 20 * 16 * (3 + 4)
    assert Case("GRU", 10, 2, 3, 4, training=True).gemm_flops() == 3 * 2 * 20 * 12 * (3 + 4)


def test_run_prints_a_table_and_writes_json_and_chart(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path)
    assert cli.main(["--filter", "T=50 B=1 I=128", "--repeats", "1", "--devices", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "LSTM train T=50 B=1 I=128 H=128" in out and "GRU infer T=50 B=1 I=128 H=128" in out
    assert "LSTMCell infer T=50 B=1 I=128 H=128" in out
    written = sorted(p.suffix for p in tmp_path.iterdir())
    assert written == [".json", ".png"]
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    results = data["devices"]["cpu"]["results"]
    assert len(results) == 8 and all(r["speedup"] > 0 and not r["error"] for r in results)
    assert data["torch"] == torch.__version__ and data["commit"]
    trained = [r for r in results if r["case"]["training"]]
    assert all(r["memory_bytes"]["gatedrnn"] > 0 and r["memory_bytes"]["torch.nn"] > 0 for r in trained)


def test_disagreement_is_reported_not_timed(monkeypatch):
    monkeypatch.setitem(measure.TOLERANCE, torch.float32, -1.0)
    result = measure.measure(Case("GRU", 5, 2, 3, 4, training=True), "cpu", repeats=1, warmup=0)
    assert "disagree" in result.error and not result.timings
    assert "not timed" in report.table([result], {torch.float32: 1.0})


def test_onnx_runtime_joins_the_cpu_inference_cases_it_measures_fairly(monkeypatch):
    """Where onnxruntime is installed: a third column in CPU inference, float32, dense cases, agreement-checked
    like the others; none in training, packed, bfloat16 or instruction-set-capped runs."""
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install onnxruntime)")
    pytest.importorskip("onnxscript", reason="needs onnxscript (pip install onnxscript)")
    from benchmarks import onnx_peer

    infer = Case("GRU", 6, 2, 3, 4, training=False)
    assert "onnxruntime" in measure.implementations("cpu", infer)
    for case in (Case("GRU", 6, 2, 3, 4, training=True), Case("GRU", 6, 2, 3, 4, False, packed=True, min_length=2),
                 Case("GRU", 6, 2, 3, 4, False, dtype=torch.bfloat16)):
        assert "onnxruntime" not in measure.implementations("cpu", case), case.label()
    result = measure.measure(Case("LSTM", 6, 2, 3, 4, training=False, layers=2, bidirectional=True), "cpu", 1, 0)
    assert not result.error and set(result.timings) == {"gatedrnn", "torch.nn", "onnxruntime"}
    assert result.max_rel_diff < 1e-5
    monkeypatch.setenv("GATEDRNN_CPU_ISA", "avx2")
    assert not onnx_peer.applies(infer, "cpu")


def test_a_disagreeing_onnx_runtime_is_reported_not_timed(monkeypatch):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install onnxruntime)")
    pytest.importorskip("onnxscript", reason="needs onnxscript (pip install onnxscript)")
    from benchmarks import onnx_peer

    real_call = onnx_peer.OnnxRuntimeModule.__call__
    monkeypatch.setattr(onnx_peer.OnnxRuntimeModule, "__call__", lambda self, x: (real_call(self, x)[0] * 1.1,))
    result = measure.measure(Case("GRU", 6, 2, 3, 4, training=False), "cpu", 1, 0)
    assert "disagrees with torch.nn" in result.error and not result.timings


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_cell_cases_time_the_cells_stepped_by_a_python_loop(mode, training):
    """A cell case: LSTMCell/GRUCell of each side, called once per step with the state carried (a decoder's
    loop), agreement-checked like the layers, and no ONNX Runtime column (it would time a different model)."""
    case = Case(mode, 6, 3, 4, 5, training=training, cell=True)
    assert case.label() == f"{mode}Cell {'train' if training else 'infer'} T=6 B=3 I=4 H=5"
    assert measure.implementations("cpu", case) == ["gatedrnn", "torch.nn"]
    modules = measure.make_modules(case, "cpu", ["gatedrnn", "torch.nn"])
    assert isinstance(modules["gatedrnn"].cell, getattr(gatedrnn, f"{mode}Cell"))
    assert type(modules["torch.nn"].cell) is getattr(torch.nn, f"{mode}Cell")
    result = measure.measure(case, "cpu", repeats=1, warmup=0)
    assert not result.error and set(result.timings) == {"gatedrnn", "torch.nn"}
    assert 0 < result.max_rel_diff < 1e-5  # float32: the two differ in rounding, and both ran


@pytest.mark.parametrize("mode,variant", [("LSTM", "zoneout"), ("GRU", "zoneout"), ("LSTM", "recurrent_dropout"),
                                          ("GRU", "recurrent_dropout"), ("GRU", "reset_after=False"),
                                          ("LSTM", "layer_norm"), ("GRU", "layer_norm")])
def test_variant_cases_time_gatedrnn_against_a_torch_nn_cell_loop(mode, variant):
    """A variant case (benchmarks/variants.py): gatedrnn with the variant, the per-step loop over torch.nn's cell
    users write today (the speed-up's baseline, making gatedrnn's draws from the same seed, so that training
    outputs and input gradients agree; checked in float64, measure.check_dtype), and gatedrnn's plain layer (what
    the variant costs)."""
    assert {c.variant for c in standard_cases("cpu")} >= {"", "zoneout", "recurrent_dropout", "reset_after=False",
                                                          "layer_norm"}
    case = Case(mode, 6, 3, 4, 5, training=True, variant=variant)
    assert measure.implementations("cpu", case) == ["gatedrnn", "torch.nn loop", "gatedrnn plain"]
    result = measure.measure(case, "cpu", repeats=1, warmup=0)
    assert not result.error and set(result.timings) == {"gatedrnn", "torch.nn loop", "gatedrnn plain"}
    assert result.max_rel_diff < 1e-9
    assert result.speedup() == result.timings["torch.nn loop"].median_ms / result.timings["gatedrnn"].median_ms
    assert variant in report.table([result], {torch.float32: 1.0})
