"""Hull: an OCI container runtime that runs every container in its own lightweight VM."""

__version__ = "0.1.0"
