"""LoRA trainer for FLUX image models."""
