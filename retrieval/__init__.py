"""Qdrant indexes of the training corpus: scarcity diagnosis and diverse retrieval."""
