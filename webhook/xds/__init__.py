"""The control plane: Envoy's aggregated discovery service (ADS) for the injected proxies."""
