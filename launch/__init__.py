"""Launchers for real runs: ``python -m launch.train`` under torchrun (one training loop)."""
