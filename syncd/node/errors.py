"""Errors of the storage node that every part may raise."""

from __future__ import annotations


class NodeError(Exception):
    """Refusal of an administrative request; the message is for the administrator."""
