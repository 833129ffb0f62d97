"""Stage one: a frozen pretrained backbone over an image dataset, written to a feature file.

`backbones/` (one module per family, found by a registry), `datasets/` (dataset sources), `loading`
(loader worker processes), `augment` (the augmented views of `--views`) and `extract` (the resumable
job). The only thing stage two needs from here is the feature file, whose format `featdp.featurefile`
specifies.

Importing this package imports nothing: loader worker processes unpickle functions from
`backbones.pil_preprocessing` and must not pay for JAX.
"""
