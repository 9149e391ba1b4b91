"""The three optimization tracks — each turns its routed cases into a reviewable artefact and
a training round — and the failure-rate slices their candidates are judged on."""
