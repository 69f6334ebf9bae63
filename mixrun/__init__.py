"""mixrun: plan and run GGUF models on asymmetric multi-GPU rigs."""

__version__ = "0.1.0"
