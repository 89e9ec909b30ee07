"""The wire contract of autoglm-edge (protocol v1), shared by `edge_agent` and `cloud_bridge`.

Protocol models, topics, error codes, the command lifecycle, signing, the settings base, the paho
session wrapper and the reconnect backoff. It imports neither app; both import it.
"""

__version__ = "0.1.0"
