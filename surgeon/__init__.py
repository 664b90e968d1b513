"""surgeon: plugin-based model surgery for ONNX.

    import surgeon
    model = surgeon.load("model.onnx")
    result = surgeon.apply(model, "tucker", {"ratio": 0.5})
    surgeon.save(result.model, "model.tucker.onnx")
    report = surgeon.validate(model, result.model, surgeon.synthesize(model))
"""

from surgeon.calibration import DataSet, load_data, synthesize
from surgeon.engine import SurgeryResult, apply
from surgeon.errors import BudgetExceeded, ModelError, PluginLoadError, SurgeonError, UsageError
from surgeon.model import load, save
from surgeon.plugin import (Candidate, Context, GraphPlugin, LayerReport, ModelPlugin, Plugin, Registry, Rewrite,
                            Skip, registry)
from surgeon.profile import profile
from surgeon.validate import validate

__version__ = "0.1.0"

__all__ = [
    "load", "save", "apply", "validate", "profile", "synthesize", "load_data", "DataSet", "SurgeryResult",
    "Plugin", "GraphPlugin", "ModelPlugin", "Candidate", "Skip", "Rewrite", "LayerReport", "Context",
    "Registry", "registry", "SurgeonError", "UsageError", "ModelError", "PluginLoadError", "BudgetExceeded",
]
