"""Host side of container networking: the client's network namespace, mirrored into the VM
with tap devices and tc redirects (Kata's "tcfilter" model). See docs/networking.md."""
