"""Stage 1, extraction: corpus windows -> one forward pass -> per-neuron top/random/quantile records and
statistics, checkpointed. The driver half is orchestrator/extraction.py."""
