"""The bwraft plugin contract: every hook a plugin may implement."""

import pluggy

PROJECT = "bwraft"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
