"""The one exception hierarchy of Hull's host side.

Every error a user can see derives from :class:`HullError`; the CLI prints its message as
one line (runc style: lower case, no final period) and exits with ``exit_code``. Messages
name the container id, path or command they concern. Causes are chained with
``raise ... from``.
"""

from __future__ import annotations


class HullError(Exception):
    """Base of every error Hull reports to a user."""

    exit_code = 1


class ConfigError(HullError):
    """configuration.toml is missing, malformed or holds a bad value."""


class BundleError(HullError):
    """The OCI bundle or its config.json cannot be used."""


class ContainerNotFound(HullError):
    """No container of that id exists under --root (runc's wording: "does not exist")."""

    def __init__(self, container_id: str) -> None:
        super().__init__(f"container {container_id} does not exist")
        self.container_id = container_id


class ContainerExists(HullError):
    def __init__(self, container_id: str) -> None:
        super().__init__(f"container with id exists: {container_id}")
        self.container_id = container_id


class InvalidState(HullError):
    """An operation the container's current status does not allow."""


class AssetError(HullError):
    """The guest kernel or image is missing, stale, or failed to build."""


class HypervisorError(HullError):
    """QEMU could not be started, or the VM failed or died."""


class BootError(HypervisorError):
    """The VM did not come up; carries the tail of the guest console."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        if console_tail:
            message = f"{message}; last guest console lines: {console_tail}"
        super().__init__(message)
        self.console_tail = console_tail


class AgentError(HullError):
    """The agent answered with an error, or broke the protocol."""


class ProtocolError(AgentError):
    """The guest sent something the host refuses: the channel is closed and the VM killed."""
