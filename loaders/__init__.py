"""encfs.loaders: feeding encrypted datasets to PyTorch."""
