"""Units other than MLP neurons: the latents of sparse autoencoders (SAEs) and transcoders, and user-supplied
directions, read at a hook point of the subject model (config `units`, docs/design.md "Units").

    dictionaries.py  a dictionary's encoder (`Dictionary.encode`: activations at the hook -> latents), read from
                     the SAELens and EleutherAI sparsify layouts with `safetensors`, or a [n, d_model] direction
                     file; writers of both layouts (tests, examples/train_sae.py)
    hooks.py         hook names (TransformerLens' `blocks.L.hook_resid_post`..., sparsify's `layers.L[.mlp]`) ->
                     the Hugging Face module and side (input/output) that carries those activations, per family
    source.py        `load_units`: the config's dictionaries checked against the model (width, hook), one per
                     layer, and the unit source recorded in run.json and every table's metadata

A unit is addressed by (layer, index) as a neuron is: the layer of its hook point and its latent's index.
"""


from schemas.config import ConfigError


class UnitsError(ConfigError):
    """A units mistake (a missing file, a wrong width, an unknown hook), reported as one line before any work."""
