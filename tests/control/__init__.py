"""End-to-end tests of the control plane (one package, so the shared cluster stops when they end)."""
