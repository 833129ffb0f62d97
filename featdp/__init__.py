"""featdp: differentially private linear heads on frozen pretrained features."""

__version__ = "0.1.0"
