"""nanofleet: the CLI, the fleet.yaml model and the one-machine supervisor (`nanofleet up`)."""
