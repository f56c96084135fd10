"""Reading and writing MobileOne weights: Apple's, timm's and mmpretrain's layouts, and our own files.

Files we write are a ``.safetensors`` (or a PyTorch file) of Apple's layout with the architecture,
the classes and the preprocessing embedded, plus a readable ``.json`` copy beside it, so a file
alone rebuilds its model. Apple's own files carry no config; the architecture is read off the
tensor shapes instead. Metadata is never trusted blindly: the embedded copy (then the JSON beside
the file) is checked against the tensors.

- ``storage``: files on disk, for every task (:func:`read_weights`, :func:`write_weights`);
- ``layouts``: the same tensors under Apple's, timm's and mmpretrain's names;
- ``metadata``: our metadata checked against the tensors;
- ``loading``: MobileOne classifiers read, loaded and saved.
"""

from .layouts import LAYOUTS, detect_layout, from_apple_layout, infer_config, to_apple_layout
from .loading import Checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .metadata import MetadataError, check_metadata
from .storage import (
    META_KEY,
    TORCH_SUFFIXES,
    CheckpointError,
    StateDict,
    checkpoint_task,
    embedded_metadata,
    load_task_state,
    read_task_weights,
    read_weights,
    write_weights,
)

__all__ = [
    "LAYOUTS",
    "META_KEY",
    "TORCH_SUFFIXES",
    "Checkpoint",
    "CheckpointError",
    "MetadataError",
    "StateDict",
    "check_metadata",
    "checkpoint_task",
    "detect_layout",
    "embedded_metadata",
    "from_apple_layout",
    "infer_config",
    "load_task_state",
    "load_checkpoint",
    "read_checkpoint",
    "read_task_weights",
    "read_weights",
    "save_checkpoint",
    "to_apple_layout",
    "write_weights",
]
