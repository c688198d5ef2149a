"""Medical image I/O: one in-memory :class:`Volume` (array + geometry) for every format."""
