"""lightning_gradguard: keep deep networks trainable in PyTorch Lightning."""

__version__ = "0.1.0"

__all__: list[str] = []
