"""nanofleet: what the agent and the controller share (fleet.yaml's model, MQTT client, task supervisor, backoff,
SQLite writer, thermal scale, topic ids) and the CLI (`nanofleet …`, `nanofleet up`, the simulator).

Dependencies go one way: protos/ ← nanofleet/ ← agent/, controller/. Nothing here imports the agent or the
controller; the CLI reaches them by name when a command runs (tests/contract/test_layers.py)."""
