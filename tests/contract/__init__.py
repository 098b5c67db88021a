"""Contract suites: one interface, every implementation, the same tests."""
