"""bwraft's built-in plugins, installed as the package ``bwraft_plugins``.

They are registered through the same ``bwraft`` entry-point group as third-party plugins.
"""
