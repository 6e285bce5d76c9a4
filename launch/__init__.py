"""Launchers of multi-process din_jax training: local processes (local.py) and Kubernetes manifests (k8s/)."""
