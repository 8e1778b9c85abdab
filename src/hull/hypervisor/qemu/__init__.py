"""The QEMU driver: pure argv generation (argv.py) apart from the process owner (machine.py)."""
