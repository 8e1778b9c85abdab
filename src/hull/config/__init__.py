"""Hull's configuration (/etc/hull/configuration.toml)."""
