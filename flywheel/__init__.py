"""flywheel: a closed-loop data flywheel for image-generation models."""

__version__ = "0.1.0"
