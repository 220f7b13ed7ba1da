"""Verifiers (reward models) and the plugin registry. Installed as ``diffsearch.verifiers``."""
