"""The cycle: the model registry, the one-cycle-at-a-time lock, and (to come) the Prefect
flow that turns failures into a reviewed, promoted model."""
