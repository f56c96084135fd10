"""The core: architecture data, the layer and the net, fusion, the fast train path, checkpoints.

Needs torch (and safetensors for our own files) only. Modules import one way, from the bottom:
``config`` <- ``fusion`` <- ``fast_train`` <- ``model`` <- ``complexity``, ``checkpoint`` <- ``factory``.
"""
