"""Guest assets: the kernel (built from Debian's linux-source or fetched) and the initrd."""
