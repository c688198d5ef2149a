"""Medical image I/O: one in-memory :class:`Volume` (array + geometry) for every format."""

from __future__ import annotations

from crlnseg.io.readers import read_case_images, read_h5_case, read_image, read_label
from crlnseg.io.volume import Geometry, Volume
from crlnseg.io.writers import write_atomic, write_image

__all__ = ["Geometry", "Volume", "read_image", "read_h5_case", "read_case_images", "read_label",
           "write_image", "write_atomic"]
