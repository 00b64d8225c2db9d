from callbacks.checkpoint import Checkpoint
from callbacks.export import ExportPretrained
from callbacks.guards import NonFiniteLossError, NonFiniteLossGuard
from callbacks.summary import RunSummary

__all__ = ["Checkpoint", "ExportPretrained", "NonFiniteLossError", "NonFiniteLossGuard", "RunSummary"]
