"""Shims: the containerd shim v2 (``v2``), its ttrpc transport and protobuf messages."""
