"""Errors a user can act on.

Every user-facing failure is an :class:`EdgeBLLError` subclass whose message says what was wrong,
where, and (after ``hint:``) how to fix it. Anything else that escapes is a bug in edgebll.
"""

from __future__ import annotations


class EdgeBLLError(Exception):
    """Base class of the errors caused by input, files or environment (not by edgebll bugs)."""


class DataError(EdgeBLLError):
    """A dataset file is missing, truncated or not what it claims to be."""


class CodecError(EdgeBLLError):
    """A message cannot be encoded (NaN/Inf, unsupported dtype) or a frame fails its checks."""


class NativeLibraryError(EdgeBLLError):
    """The native codec library was asked for but is not built or cannot be loaded."""


class ManifestError(EdgeBLLError):
    """A block artifact folder does not match its manifest, or the manifest itself is invalid."""


class ExportError(EdgeBLLError):
    """A model cannot be exported as requested (bad block count, unsupported layer, ...)."""


class TrainingError(EdgeBLLError):
    """Training cannot go on (a non-finite loss, a message that does not fit the next block)."""


class DeviceError(EdgeBLLError):
    """A device profile is missing or invalid (unknown key, wrong type, a budget larger than the RAM)."""


class MemoryCapError(DeviceError):
    """A block ran out of memory under the cap it was given (``edgebll profile --enforce-budget``)."""


class DiskFullError(EdgeBLLError):
    """A checkpoint cannot be written: the disk (or the user's quota) has no room for it."""
