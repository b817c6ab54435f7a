"""Neural-network layers, losses and the flat parameter buffer."""

from . import functional
from .flat import FlatBuffer, flatten
from .module import (ACTIVATIONS, MLP, Identity, Linear, Module, Parameter, ReLU, Sequential, Sigmoid,
                     Tanh)

__all__ = ["functional", "FlatBuffer", "flatten", "ACTIVATIONS", "MLP", "Identity", "Linear", "Module",
           "Parameter", "ReLU", "Sequential", "Sigmoid", "Tanh"]
