"""Example jobs: their user functions and the data they read."""
