"""Imported at start-up (as ``sitecustomize``) by wraith processes that tests start with
this directory on PYTHONPATH (``helpers.GENERIC_PUMP_ENV``): it turns off the fused
socket<->channel paths of ``ssh/target_open.py``, so the server dials every target
(and the client every remote-forward target) through asyncssh's own channel and the
generic ``relay.RelayEnd`` pump — the path wraith takes when asyncssh's internals
are not the ones it knows, or a forwarded-tcpip open names a listener it did not
record. The tests then hold that pump to the same rules."""

import wraith_core.ssh.target_open as _target_open

_target_open.pending_channel = lambda *args, **kwargs: None
_target_open.pending_dial = lambda *args, **kwargs: None

import sys as _sys

print("test: fused socket channels off, generic relay pump on", file=_sys.stderr, flush=True)
