"""Adapters of a team's stack: each module fills one or more ports (:mod:`flywheel.ports`)
and exposes an :class:`~flywheel.adapters.base.Adapter` per adapter name; the project file
picks them by name (:data:`flywheel.project.ADAPTERS`)."""
