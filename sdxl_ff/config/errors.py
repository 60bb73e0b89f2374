"""The one base of every error the user can fix: main() prints its message and exits with its exit code.

Each subclass is raised where the cause is known, with the key or file, the value and the remedy in
its message (ConfigError, DataError, ResumeError, SaveError, ExportFailed, AnomalyError).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user must fix (a config key, a file, the disk); no traceback, just the message."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration problem the user must fix; the message names key, value and remedy."""


class AnomalyError(UserError, RuntimeError):
    """A non-finite loss stopped the run; the message names the step, the files and the last good state."""

    exit_code = 3
