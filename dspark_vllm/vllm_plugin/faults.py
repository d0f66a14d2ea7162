"""What a fault inside DSpark's per-step path leaves behind: one log line per kind, a count.

The plugin boundary (``patches.propose_guarded``) turns any exception of a step into a step
without drafts; :class:`FaultLog` says so once per kind (exception type and the DSpark line it
came through), with the traceback and the step's request ids, so a recurring fault neither
floods the log nor goes unseen.
"""

from __future__ import annotations

import logging
import os

from . import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fault_site(exc: BaseException) -> str:
    """file:line:function of the innermost frame of ``exc``'s traceback inside this package
    (a fault deep in torch is named by the DSpark line that called into it)."""
    tb, site = exc.__traceback__, "?"
    while tb is not None:
        code = tb.tb_frame.f_code
        if site == "?" or os.path.abspath(code.co_filename).startswith(_PACKAGE):
            site = f"{os.path.basename(code.co_filename)}:{tb.tb_lineno}:{code.co_name}"
        tb = tb.tb_next
    return site


class FaultLog:
    """Logs each kind of step fault once."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()  # (exception type, code site)

    def record(self, exc: BaseException, req_ids: list[str]) -> None:
        kind = (type(exc).__name__, fault_site(exc))
        if kind in self.seen:
            return
        self.seen.add(kind)
        logger.error("DSpark: drafting failed at %s (%s: %s) for requests %s; serving this step without drafts "
                     "(logged once per kind; counted in dspark:step_faults_total)", kind[1], kind[0], exc,
                     req_ids[:16], exc_info=exc)
