"""bwraft core: the Raft kernel, the plugin host and the node runtime."""

__version__ = "0.1.0"
