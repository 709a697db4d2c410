"""Backends shipped with the core: the embedded CPU backend and a base for onnxruntime builds."""
