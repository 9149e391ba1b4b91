"""Failure cases: what the loop works on, made from signals (see :mod:`flywheel.cases.service`)."""
