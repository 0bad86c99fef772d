"""InstructPix2Pix inference engine: ``from engine import EditPipeline``."""
from engine.config import EditConfig, ModelConfig
from engine.errors import CompileError, InputError, NumericalError
from engine.pipeline import EditPipeline, EditResult

__all__ = ["CompileError", "EditConfig", "EditPipeline", "EditResult", "InputError", "ModelConfig", "NumericalError"]
