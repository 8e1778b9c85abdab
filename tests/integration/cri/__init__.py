"""Kubernetes CRI tests: containerd's CRI plugin with a `hull` runtime handler."""
