"""Cluster state for the policy engine: an indexed in-memory store and its sources (live API, manifest files)."""
