"""The device agent: local socket API, router, model runtime, cloud client, offline queue, telemetry."""
