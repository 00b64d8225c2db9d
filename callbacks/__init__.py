from callbacks.checkpoint import Checkpoint
from callbacks.guards import NonFiniteLossError, NonFiniteLossGuard
from callbacks.summary import RunSummary

__all__ = ["Checkpoint", "NonFiniteLossError", "NonFiniteLossGuard", "RunSummary"]
