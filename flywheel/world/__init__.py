"""The verifiable world of the embedded default: scenes whose truth is known."""
