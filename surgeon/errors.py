"""Errors a user can act on. The CLI prints their message on one line and maps them to exit codes."""


class SurgeonError(Exception):
    """A failure that is not the user's fault in the input (exit code 1)."""

    exit_code = 1


class UsageError(SurgeonError):
    """Bad options, unknown plugin, unreadable or invalid input (exit code 2)."""

    exit_code = 2


class ModelError(UsageError):
    """The model file cannot be read, parsed or checked."""


class RuntimeLoadError(ModelError):
    """onnxruntime refuses to load the model (an op it does not know, a type it does not run)."""


class PluginLoadError(UsageError):
    """A plugin package could not be imported or registered."""


class BudgetExceeded(SurgeonError):
    """A drift or latency budget was crossed (exit code 1)."""
