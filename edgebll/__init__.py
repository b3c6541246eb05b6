"""edgebll: block-local training on edge devices (device runtime; imports no torch)."""

from __future__ import annotations

__version__ = "0.1.0"
