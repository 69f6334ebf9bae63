"""mixrun's own tensor-parallel x pipeline runtime on torch.distributed."""
