"""discrnn: discrete-activation units, bit-packed codecs and memory-lean recurrent layers."""

from ._validation import DeviceError, DTypeError, ShapeError, StateDTypeError, StateRangeWarning
from .codec import PackedTensor, decode, encode, pack, quantize_pack, unpack, unpack_dequantize
from .modules import DiscreteSigmoid, DiscreteTanh
from .rnn import DiscreteGRU, DiscreteLSTM
from .rnn_state import PackedRNNState
from .units import discrete_sigmoid, discrete_tanh

__version__ = "0.1.0.dev0"

__all__ = [
    "DTypeError",
    "DeviceError",
    "DiscreteGRU",
    "DiscreteLSTM",
    "DiscreteSigmoid",
    "DiscreteTanh",
    "PackedRNNState",
    "PackedTensor",
    "ShapeError",
    "StateDTypeError",
    "StateRangeWarning",
    "decode",
    "discrete_sigmoid",
    "discrete_tanh",
    "encode",
    "pack",
    "quantize_pack",
    "unpack",
    "unpack_dequantize",
]
