"""crlnseg: semi-supervised 3D medical image segmentation with the CRLN method."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
