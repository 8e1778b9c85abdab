"""Log records that name the container: every component stamps the id it serves."""

from __future__ import annotations

import logging


class ContainerIdFilter(logging.Filter):
    """Stamps every record with the container id the process serves (a pod's shim: the
    sandbox's), unless the record names its own container."""

    def __init__(self, container_id: str) -> None:
        super().__init__()
        self.container_id = container_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "container_id", None):
            record.container_id = self.container_id
        return True
