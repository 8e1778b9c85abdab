"""The runtime: sandbox and container lifecycle, state on disk. Front ends call into it."""
