"""Test-time registers ("Vision Transformers Don't Need Trained Registers", Jiang et al. 2025): find the register
neurons of a model trained without registers, and shift their activations into an extra token at inference."""

from .apply import apply_register_neurons, with_test_time_registers
from .neurons import RegisterNeurons, find_register_neurons

__all__ = [
    "RegisterNeurons",
    "apply_register_neurons",
    "find_register_neurons",
    "with_test_time_registers",
]
