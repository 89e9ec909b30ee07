"""autoglm-edge: an MQTT edge agent that runs GLM models with llama.cpp."""

__version__ = "0.1.0"
