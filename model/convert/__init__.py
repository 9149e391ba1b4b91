"""Converters between diffusers checkpoints of the Qwen-Image-2.1 family and ours."""
