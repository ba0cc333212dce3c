"""Typed records the method works on. Raw activations are kept signed and unnormalized (docs/method.md §1)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ActivationRecord:
    """One corpus window and one neuron's raw activation on each of its tokens."""
    seq_id: int
    tokens: list[str]
    activations: list[float]
    kind: str = "top"  # top | bottom | random | quantile | stratified | non_activating
    rank: int = 0

    @property
    def max_activation(self) -> float:
        return max(self.activations) if self.activations else float("-inf")


@dataclass
class NeuronRecords:
    layer: int
    neuron: int
    top: list[ActivationRecord] = field(default_factory=list)  # sorted by max activation, descending
    random: list[ActivationRecord] = field(default_factory=list)
    quantile: list[ActivationRecord] = field(default_factory=list)
    bottom: list[ActivationRecord] = field(default_factory=list)  # sorted by min activation, ascending
    # classifier windows (docs/method.md §2): activating ones by bin (rank = bin * per bin + i), non-activating ones
    stratified: list[ActivationRecord] = field(default_factory=list)
    non_activating: list[ActivationRecord] = field(default_factory=list)
