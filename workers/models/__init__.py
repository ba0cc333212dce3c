"""Stage 0, the subject model: the architecture registry (where each family keeps its MLP neurons) and
loading a Hugging Face causal LM, or the embedded SmolLM2 default, ready for capture."""

MODEL_SOURCES_ENV = "NEURONSWEEP_MODEL_SOURCES"  # comma-separated modules that register model sources (loading.py)
