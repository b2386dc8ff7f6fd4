"""The two ways `up`, `down` and `status` fail; the command line turns each into an exit status."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class DeployError(Exception):
    """The system could not be brought up or down: reported as one line, exit status 1."""
