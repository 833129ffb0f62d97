"""Frozen pretrained image backbones (JAX/Flax) used as feature extractors.

Modules are imported on demand (see `featdp.extraction.backbones.registry`): loader worker processes unpickle
`pil_preprocessing` functions from this package and must not pay for importing JAX and flax.
"""
