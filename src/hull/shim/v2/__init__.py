"""containerd shim v2 for Hull (runtime io.containerd.hull.v2): one VM per pod."""
