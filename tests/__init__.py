"""The test suite as a package, so `tests.conftest` is this folder's even when a dependency installs a top-level
`tests` package of its own (gmqtt 0.8.0's wheel does)."""
