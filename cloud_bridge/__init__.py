"""cloud-bridge: the fleet registry, command dispatcher and operator console of autoglm-edge.

It speaks protocol v1 (docs/protocol.md) over MQTT and keeps its state in one SQLite file that the
`serve` process and the console subcommands share.
"""
