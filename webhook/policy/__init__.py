"""Policy enforcement: NetworkPolicy coverage and mutual TLS for every Pod and pod controller."""
