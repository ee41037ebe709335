"""Framework adapters: NumPy is the base case (Weights *are* NumPy arrays); PyTorch and
scikit-learn live in their own modules so their imports stay optional."""
