"""Ray Serve deployments over the pipeline stages, the request router and the application builder."""
