"""gatedrnn: fused LSTM/GRU kernels for PyTorch, as drop-in replacements for torch.nn's layers.

    import gatedrnn
    lstm = gatedrnn.LSTM(512, 512, num_layers=2)   # same arguments, parameters and outputs as nn.LSTM
    lstm.load_state_dict(nn_lstm.state_dict())
    model = gatedrnn.convert(model)                 # or swap every nn.LSTM/GRU/LSTMCell/GRUCell in a model
    lstm = gatedrnn.from_keras(keras_layer)         # a Keras 3 LSTM/GRU/Bidirectional, weights and all
"""
from ._extension import backend_info
from . import _onnx, _ops  # noqa: F401  (_ops registers fake kernels and autograd for torch.ops.gatedrnn)
from . import functional, reference
from .modules import GRU, LSTM, GRUCell, LSTMCell
from ._convert import convert
from ._keras import GoBackwards, from_keras, to_keras_weights

_onnx.register_translations()  # for torch.onnx.export: now, or once the exporter imports onnxscript (see _onnx.py)

__all__ = ["LSTM", "GRU", "LSTMCell", "GRUCell", "GoBackwards", "backend_info", "convert", "from_keras", "functional",
           "reference", "to_keras_weights"]
__version__ = "0.1.0"
