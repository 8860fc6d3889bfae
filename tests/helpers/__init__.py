"""Helpers shared by the tests (the real stack, Prefect API reads, simulated fabs); fixtures stay in conftest."""
