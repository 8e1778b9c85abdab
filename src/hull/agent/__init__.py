"""The guest agent: PID 1 of the VM, serves the host over one channel (see docs/internals.md).

Standard library and :mod:`hull.agentapi` only. Entry point: :func:`hull.agent.main.main`.
"""
