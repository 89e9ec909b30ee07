"""autoglm-edge: an MQTT edge agent that runs GLM models with llama.cpp."""
