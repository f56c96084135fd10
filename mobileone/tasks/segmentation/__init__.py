"""Semantic segmentation: DeepLabV3 and LR-ASPP on MobileOne (and MobileNetV3-Large peers) on the training engine."""
