from callbacks.checkpoint import Checkpoint
from callbacks.export import ExportPretrained
from callbacks.guards import NonFiniteLossError, NonFiniteLossGuard
from callbacks.progress import StepAwareRichProgressBar
from callbacks.summary import RunSummary
from callbacks.throughput import Throughput

__all__ = ["Checkpoint", "ExportPretrained", "NonFiniteLossError", "NonFiniteLossGuard", "RunSummary", "StepAwareRichProgressBar",
           "Throughput"]
