"""jaxinfer: LLM inference optimization research in JAX/XLA. Public API only."""

from jaxinfer.checkpoint import load_model, save_converted
from jaxinfer.compilation import enable_compilation_cache
from jaxinfer.config import (BenchConfig, DecodeConfig, EngineConfig, ModelConfig, RunConfig, SamplingConfig,
                             load_config)
from jaxinfer.engine import Completion, Engine, EngineBusy
from jaxinfer.generate import GenerationResult, Generator, generate
from jaxinfer.models import Model, init_model
from jaxinfer.scheduler import UnknownRequest
from jaxinfer.tokenizer import load_tokenizer

__all__ = [
    "BenchConfig", "Completion", "DecodeConfig", "Engine", "EngineBusy", "EngineConfig", "GenerationResult",
    "Generator", "Model", "ModelConfig", "RunConfig", "SamplingConfig", "UnknownRequest", "enable_compilation_cache",
    "generate", "init_model", "load_config", "load_model", "load_tokenizer", "save_converted",
]
__version__ = "0.1.0"
