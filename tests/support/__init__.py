"""Real parts for tests: a mosquitto broker, the agent as a subprocess, a cloud-side MQTT client."""
