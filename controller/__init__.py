"""The controller: MQTT ingest, SQLite store, policy, rollouts, dashboard and REST API."""
