"""Semantic segmentation: DeepLabV3 and LR-ASPP on MobileOne (and MobileNetV3-Large peers) on the training engine.

Importing the package registers its documented builders (``builders``) in the model registry.
"""

from . import builders  # noqa: F401
