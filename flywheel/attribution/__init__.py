"""Attribution: evidence per failure case, the track classifier, routing and overrides."""
