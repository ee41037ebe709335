"""Framework adapters: NumPy is the base case (Weights *are* NumPy arrays); PyTorch and
scikit-learn live in their own modules so their imports stay optional."""

ONNX_OPSET = 18
"""The ONNX opset the adapters export to: every ONNX Runtime since 1.14 (2023) runs it,
and it has every operator a classifier needs."""
ONNX_INPUT = "input"
"""The exported graph's one input: a batch of examples, its first dimension ``batch``."""
