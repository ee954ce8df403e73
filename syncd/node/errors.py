"""Errors of the storage node that every part may raise."""

from __future__ import annotations


class NodeError(Exception):
    """Refusal of an administrative request; the message is for the administrator."""


class NotFound(NodeError):
    """The request names a group, volume, host or other object that does not exist."""
