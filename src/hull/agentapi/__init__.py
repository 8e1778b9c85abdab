"""The one agent API, shared by the host and the guest agent.

Stdlib only: the guest agent imports this package and nothing else of Hull's host side.
``framing`` defines the multiplexed frames on the host<->guest channel, ``schema`` the
control messages carried in them and how each side validates what it receives.
"""
