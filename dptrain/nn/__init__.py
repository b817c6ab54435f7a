"""Neural-network layers, losses and the flat parameter buffer."""

from . import functional, init, random
from .flat import FlatBuffer, flatten
from .init import manual_seed
from .layers import (GELU, AvgPool1d, AvgPool2d, Conv1d, Conv2d, Dropout, Embedding, Flatten, LayerNorm, MaxPool1d,
                     MaxPool2d, MultiheadSelfAttention, TransformerBlock)
from .module import (ACTIVATIONS, MLP, Identity, Linear, Module, Parameter, ReLU, Sequential, Sigmoid,
                     Tanh)

__all__ = ["functional", "init", "random", "manual_seed", "FlatBuffer", "flatten", "ACTIVATIONS", "MLP",
           "Identity", "Linear", "Module", "Parameter", "ReLU", "Sequential", "Sigmoid", "Tanh", "GELU",
           "AvgPool1d", "AvgPool2d", "Conv1d", "Conv2d", "Dropout", "Embedding", "Flatten", "LayerNorm",
           "MaxPool1d", "MaxPool2d", "MultiheadSelfAttention", "TransformerBlock"]
