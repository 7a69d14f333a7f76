"""The package's base error and the control socket's errors, standard library only.

Errors that come from the daemon carry its ``code`` and ``message`` verbatim (CONTROL.md,
"Errors"), so that a trainer can tell a busy name (``busy``) from a budget refusal
(``no_memory``) without parsing text, and a log shows exactly what the daemon said.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

__all__ = ["WeightfsError", "SafetensorError", "NoReplicaError", "DaemonError",
           "DaemonUnreachableError"]


class WeightfsError(Exception):
    """Base of every error class this package defines, so that ``except weightfs.WeightfsError``
    catches whatever weightfs itself raises about files, manifests, versions and the daemon.
    Each subclass also keeps the builtin base it had (``ValueError``, ``RuntimeError``,
    ``FileNotFoundError``, …), so code written against those keeps working. Bad arguments
    (a wrong type, an unknown option) raise plain ``ValueError``/``TypeError`` as usual."""


class SafetensorError(WeightfsError):
    """What ``safetensors.SafetensorError`` (an ``Exception`` subclass) reports, raised by
    :func:`weightfs.safe_open`: a tensor name the file does not contain, a closed file, a
    framework other than torch. Named alike so that code ported from safetensors reads the
    same; a malformed header raises :class:`weightfs.HeaderError`, which is one too."""


class NoReplicaError(WeightfsError, RuntimeError):
    """``prefer="ipc"`` was asked and the file has no GPU replica this process can use (no
    ``user.weightfs.cuda`` record, or none on a visible GPU matching the device). The message
    says which replicas exist and which GPUs the process sees."""


class DaemonError(WeightfsError):
    """The daemon refused or failed a request. ``code`` is its error code (``invalid``,
    ``busy``, ``no_memory``, ``forbidden``, ``cancelled``, ``not_found``, ``internal``, …),
    ``message`` its message verbatim, ``status`` the HTTP status (0 when the error came as a
    line of an upgraded connection) and ``budget`` the numbers of a budget refusal (or None)."""

    def __init__(self, code: str, message: str, status: int = 0,
                 budget: Optional[Mapping[str, Any]] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.budget = dict(budget) if budget is not None else None

    def __str__(self) -> str:
        return f"{self.message} ({self.code})" if self.code else self.message

    @classmethod
    def from_answer(cls, obj: Any, status: int = 0, what: str = ""):
        """The error of a daemon answer ``{"error": {"code", "message", "budget"?}}``; an answer
        of another shape (an old daemon's ``{"error": "…"}``, a proxy's text) is kept whole in
        the message, so nothing the daemon said is lost."""
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            code = err.get("code") if isinstance(err.get("code"), str) else ""
            return cls(code, err["message"], status, err.get("budget"))
        if isinstance(err, str):
            return cls("", err, status)
        return cls("", f"{what}unexpected answer from the daemon: {obj!r}", status)


class DaemonUnreachableError(WeightfsError, ConnectionError):
    """Nobody answers on the control socket (no socket, nobody listening), or this process may
    not connect to it. The message says which socket and why, as the CLI does."""
