"""Frozen pretrained image backbones (JAX/Flax) used as feature extractors."""

from featdp.backbones.efficientnet_lite import (
    FEATURE_DIM,
    EfficientNetLite,
    EfficientNetLiteConfig,
    get_config,
    preprocess,
)
from featdp.backbones.efficientnet_lite_weights import (
    CheckpointMismatchError,
    checkpoint_path,
    file_sha256,
    load_efficientnet_lite,
    torch_to_flax_variables,
)
from featdp.backbones.torch_checkpoint import UnsupportedCheckpointError, load_torch_state_dict

__all__ = [
    "FEATURE_DIM",
    "CheckpointMismatchError",
    "EfficientNetLite",
    "EfficientNetLiteConfig",
    "UnsupportedCheckpointError",
    "checkpoint_path",
    "file_sha256",
    "get_config",
    "load_efficientnet_lite",
    "load_torch_state_dict",
    "preprocess",
    "torch_to_flax_variables",
]
