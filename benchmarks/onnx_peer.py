"""ONNX Runtime as a third implementation in CPU inference cases: what most teams serve recurrent models with.

torch.nn's module of the case (the same weights gatedrnn gets) is exported with torch.onnx.export at the case's
exact shape and run by onnxruntime with torch's thread count, so that all three use the same cores. It is only
offered where it measures the same thing: CPU, inference, float32, dense input, and no instruction-set cap (a
capped run cannot cap ONNX Runtime's kernels).
"""
import copy
import importlib.util
import io
import logging
import os
import warnings

import torch

NAME = "onnxruntime"


def available():
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript", "onnx"))


def applies(case, device):
    return (device == "cpu" and available() and not case.training and not case.packed and not case.cell
            and case.dtype == torch.float32 and not os.environ.get("GATEDRNN_CPU_ISA"))


def describe():
    """One line for the report: the version and the threads it runs with."""
    import onnxruntime

    return (f"onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} intra-op threads "
            "(torch.nn's module exported to ONNX)")


class OnnxRuntimeModule:
    """Runs an exported module in an onnxruntime session; called like the module (input -> (output,)), with the
    output as a torch tensor, so that the agreement check compares it like the others."""

    def __init__(self, module, x):
        import onnxruntime

        # An inference copy: the original stays torch.nn's timed module, as it was. torch.nn's RNN reassigns its
        # flat-weight list while being traced, which the exporter warns about; it is torch's, and harmless here.
        # The exporter also logs, at every export, four lines that torchvision's ops are skipped (torchvision is
        # not installed): noise in the report, so its registry's logger is held at ERROR meanwhile.
        registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = registry_log.level
        registry_log.setLevel(logging.ERROR)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The tensor attributes self._flat_weights")
                program = torch.onnx.export(copy.deepcopy(module).eval(), (x,), dynamo=True, verbose=False)
        finally:
            registry_log.setLevel(level)
        buffer = io.BytesIO()
        program.save(buffer)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # ONNX Runtime's workers spin-wait after each run by default: on a 2-core machine they would take the
        # cores from whichever implementation the interleaved timing runs next (seen: gatedrnn's LSTM at 0.68x
        # of torch.nn with spinning, 1.0x without). Parked workers keep the comparison fair.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x):
        outputs = self.session.run(None, {self.input_name: x.detach().numpy()})
        return (torch.from_numpy(outputs[0]),)

    # What the timing loop calls on modules; a session has no gradients.
    def zero_grad(self, set_to_none=True):
        pass
