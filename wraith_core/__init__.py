"""wraith: SSH tunnels with pluggable transports.

The public API::

    from wraith_core import ConnectOptions, ServeOptions, open_stream, serve
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from .errors import WraithError

# Recent cryptography releases warn that DSA is deprecated as soon as asyncssh's modules
# merely name the DSA types at import. wraith negotiates only asyncssh's default
# algorithms, which leave ssh-dss out; the warning would otherwise open every command's
# output (and break its one-line errors).
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh(\.|$)")

if TYPE_CHECKING:  # what the lazy attributes below resolve to, for type checkers
    from .events import create_event_target
    from .options import ConnectOptions, ServeOptions
    from .server_api import serve
    from .stream import open_stream

__all__ = ["ConnectOptions", "ServeOptions", "WraithError", "create_event_target", "open_stream", "serve",
           "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # Lazy imports keep `import wraith_core` cheap and free of asyncssh (the option
    # objects need it too, to read keys): the command line starts with it.
    if name in ("ConnectOptions", "ServeOptions"):
        from . import options

        return getattr(options, name)
    if name == "open_stream":
        from .stream import open_stream

        return open_stream
    if name == "serve":
        from .server_api import serve

        return serve
    if name == "create_event_target":
        from .events import create_event_target

        return create_event_target
    raise AttributeError(name)
