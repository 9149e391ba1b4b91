"""The human review queue: triage, artefacts for training, model promotion."""
