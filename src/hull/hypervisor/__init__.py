"""Hypervisor drivers behind one interface (hull.hypervisor.base.Hypervisor)."""
