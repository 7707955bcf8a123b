"""Speed fix for the iroh Python bindings' buffer copy.

The uniffi-generated ``iroh/iroh_ffi.py`` (iroh 1.x) lowers every ``bytes``
argument — every buffer written to a QUIC stream — into a Rust buffer with a
Python loop, one byte per iteration::

    def write(self, value):
        with self._reserve(len(value)):
            for i, byte in enumerate(value):
                self.rbuf.data[self.rbuf.len + i] = byte

That caps a stream at a few MB/s. ``apply()`` replaces that one method with a
single ``ctypes.memmove`` into the same reserved space.

Guards, so that a release which already fixed (or changed) this is left alone:
the method's source must be exactly the byte loop above, the buffer struct
must have the expected fields, and after patching a self-test must produce
byte-identical buffers to the original method, else the original is restored.
``WRAITH_IROH_NO_PATCH=1`` disables the fix (for measuring it).
"""

from __future__ import annotations

import ctypes
import inspect
import logging
import os
import re
from types import ModuleType
from typing import Any

log = logging.getLogger("wraith.transport")

_SLOW_LOOP = re.compile(
    r"def write\(self, value\):\s*"
    r"with self\._reserve\(len\(value\)\):\s*"
    r"for i, byte in enumerate\(value\):\s*"
    r"self\.rbuf\.data\[self\.rbuf\.len \+ i\] = byte\s*$"
)

# state for tests and the benchmark: "patched" | "disabled" | "not-needed" | "failed: ..."
status = "not-applied"


def _source(fn: Any) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def needs_patch(ffi: ModuleType) -> bool:
    """True if ``ffi`` has the byte-at-a-time ``_UniffiRustBufferBuilder.write``."""
    builder = getattr(ffi, "_UniffiRustBufferBuilder", None)
    buffer = getattr(ffi, "_UniffiRustBuffer", None)
    if builder is None or buffer is None or getattr(builder.write, "_wraith_memmove", False):
        return False
    fields = dict(getattr(buffer, "_fields_", []))
    if fields.get("data") is not ctypes.POINTER(ctypes.c_char) or "len" not in fields:
        return False
    if not hasattr(builder, "_reserve"):
        return False
    return bool(_SLOW_LOOP.search(_source(builder.write).strip()))


def _memmove_write(self: Any, value: Any) -> None:
    if not isinstance(value, bytes):
        value = bytes(value)
    n = len(value)
    with self._reserve(n):
        if n:
            base = ctypes.cast(self.rbuf.data, ctypes.c_void_p).value
            ctypes.memmove(base + self.rbuf.len, value, n)


_memmove_write._wraith_memmove = True  # type: ignore[attr-defined]


def _build(ffi: ModuleType, value: bytes | memoryview) -> bytes:
    builder = ffi._UniffiRustBufferBuilder()
    try:
        builder.write_u8(7)
        builder.write(value)
        builder.write_u8(9)
        rbuf = builder.rbuf
        address = ctypes.cast(rbuf.data, ctypes.c_void_p).value
        return ctypes.string_at(address, rbuf.len) if address else b""
    finally:
        builder.discard()


def apply(ffi: ModuleType | None = None) -> str:
    """Patch ``iroh.iroh_ffi`` in place if it has the slow copy; returns the new ``status``."""
    global status
    if ffi is None:
        from iroh import iroh_ffi as ffi
    assert ffi is not None
    builder = ffi._UniffiRustBufferBuilder if hasattr(ffi, "_UniffiRustBufferBuilder") else None
    if builder is not None and getattr(builder.write, "_wraith_memmove", False):
        status = "patched"
        return status
    if os.environ.get("WRAITH_IROH_NO_PATCH"):
        status = "disabled"
        return status
    if not needs_patch(ffi):
        status = "not-needed"
        return status
    assert builder is not None
    original = builder.write
    sample = bytes(range(256)) * 5 + b"wraith"
    try:
        expected = _build(ffi, sample)
        builder.write = _memmove_write
        got = _build(ffi, sample)
        got_view = _build(ffi, memoryview(bytearray(sample)))
        if got != expected or got_view != expected:
            raise RuntimeError("self-test mismatch")
    except Exception as exc:  # never break iroh: put the original back
        builder.write = original
        status = f"failed: {exc}"
        log.warning("iroh speed fix not applied (%s)", exc)
        return status
    status = "patched"
    return status
