"""Post-processing of label maps: keep the largest connected component of each class.

Off by default (the literature's protocol has no post-processing). Components are 26-connected
(full connectivity, as MONAI's ``KeepLargestConnectedComponent``); voxels of a class outside its
largest component become background (0).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["keep_largest_component"]


def keep_largest_component(mask: np.ndarray, classes: list[int] | None = None) -> np.ndarray:
    """A copy of ``mask`` (X, Y, Z) where each foreground class keeps only its largest component.

    ``classes`` defaults to every non-zero value present.
    """
    out = mask.copy()
    labels = [int(c) for c in np.unique(mask) if c != 0] if classes is None else classes
    structure = ndimage.generate_binary_structure(3, 3)
    for cls in labels:
        binary = mask == cls
        components, count = ndimage.label(binary, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0  # the background of this class's map
        out[binary & (components != int(sizes.argmax()))] = 0
    return out
