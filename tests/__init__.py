"""nanofleet's test suite: a regular package, so that a dependency shipping a top-level `tests` package
(gmqtt's wheel does) cannot shadow it and break `from tests.conftest import ...`."""
