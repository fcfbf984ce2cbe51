"""jaxinfer: LLM inference optimization research in JAX/XLA. Public API only.

Names load on first use (PEP 562), so `import jaxinfer.scheduler` and the other host modules do
not pull in jax through the package.
"""

import importlib

_HOME = {
    "load_model": "checkpoint", "save_converted": "checkpoint",
    "enable_compilation_cache": "compilation",
    "BenchConfig": "config", "DecodeConfig": "config", "EngineConfig": "config", "ModelConfig": "config",
    "RunConfig": "config", "SamplingConfig": "config", "ServeConfig": "config", "SpeculativeConfig": "config",
    "load_config": "config",
    "Completion": "engine", "Engine": "engine", "EngineBusy": "engine", "Scored": "engine",
    "GenerationResult": "generate", "Generator": "generate",  # the function: jaxinfer.generate.generate
    "Model": "models", "init_model": "models",
    "UnknownRequest": "scheduler",
    "perplexity": "scoring",
    "load_tokenizer": "tokenizer",
}
__all__ = sorted(_HOME)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'jaxinfer' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"jaxinfer.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOME))
