"""OCI runtime-spec: bundles, config.json, state JSON."""
