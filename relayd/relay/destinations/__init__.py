"""Destinations: where the relay publishes committed files.

One small interface (:class:`Destination`: ``deliver`` + ``close``), a registry keyed by the
config ``type``, and one module per kind. Importing this package registers the built-in kinds::

    dest = create_destination(config.destinations["partner"])
    outcome = await dest.deliver(payload)      # DestinationError(retryable=...) on failure
    await dest.close()
"""

from relayd.relay.destinations.base import (Destination, DestinationError, Outcome, Payload, create_destination,
                                            register, registered_kinds)
from relayd.relay.destinations import local, peer, sftp  # noqa: F401  (registers the kinds)

__all__ = ["Destination", "DestinationError", "Outcome", "Payload", "create_destination", "register",
           "registered_kinds"]
