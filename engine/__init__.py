"""InstructPix2Pix inference engine: ``from engine import EditPipeline``."""
from engine.config import EditConfig, ModelConfig
from engine.errors import InputError, NumericalError
from engine.pipeline import EditPipeline, EditResult

__all__ = ["EditConfig", "EditPipeline", "EditResult", "InputError", "ModelConfig", "NumericalError"]
