"""Router expert-utilisation profiling: hooks at the router, streaming statistics, thresholds."""
