"""The controller: MQTT ingest into a SQLite store, the device state machine (devstate), policy compilation and
publishing, commands to devices, the dashboard and REST API; the gateway is a separate process (gateway/).
There are no rollouts yet: DESIGN.md's `nanofleet rollout` is not implemented.

Exceptions: one tree rooted at ControllerError (errors.py).
"""
