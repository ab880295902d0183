"""The test suite's one plugin (tests/support): shared fixtures and helpers for every directory."""

pytest_plugins = ["tests.support.plugin"]
