"""Render and submit stages to Slurm, Kubernetes or local subprocesses."""
