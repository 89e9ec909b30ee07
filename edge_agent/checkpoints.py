"""Named points on a command's way through the agent, where the fault tests kill it.

Production code calls `checkpoints.reached(name)` (looked up on this module at each call) and
nothing happens; a test launcher replaces `reached` before the agent starts
(`tests/support/faulty_agent.py`: SIGKILL at the n-th pass of a point). See docs/reliability.md.
"""

from __future__ import annotations

POINTS = (
    "command_stored",  # a command committed and synced, its PUBACK not sent (link)
    "command_running",  # a command claimed, its handler not started; early start: run, reply not stored (executor)
    "reply_stored",  # a terminal reply committed, not yet published (executor)
    "row_published",  # an outbox row handed to paho, its PUBACK not processed (link)
    "model_downloaded",  # a deploy's file verified and renamed into place, its activation not asked (model_deploy)
    "model_loading",  # an activation journalled `loading`, the old model still loaded (model_deploy)
    "model_canary",  # the new model loaded, journalled `canary`, its canary not run (model_deploy)
    "model_activated",  # the new slot committed active, the reply not stored (model_deploy)
)


def reached(name: str) -> None:
    """The agent passes the point `name` (one of POINTS). A no-op unless a test replaced it."""
