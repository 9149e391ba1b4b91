"""Signals: evaluation results, mined bad cases and user feedback, with provenance."""
