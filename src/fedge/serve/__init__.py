"""Serving the trained model: `export` turns weights and an app's architecture into an
ONNX file that ONNX Runtime runs without fedge, the app or its framework.

Imports nothing heavy: onnx and onnxruntime (the ``serve`` extra) load on first use.
"""
