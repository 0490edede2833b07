"""Rewrite a safetensors file's header to an exact length (space padding, as the format allows)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BASE_LENGTH = 66048  # 0x10200: with + k, the two low bytes of the length are (k, 0x02)


def with_header_length(path: Path, length: int) -> None:
    """Rewrite a safetensors file so its header is exactly `length` bytes (space-padded)."""
    raw = path.read_bytes()
    (old,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(json.loads(raw[8 : 8 + old]), separators=(",", ":")).encode()
    assert len(header) <= length
    path.write_bytes(struct.pack("<Q", length) + header.ljust(length) + raw[8 + old :])
