"""The CRLN method (paper Sec. 3-4), pure torch, no file I/O.

``METHOD.md`` in this folder is the implementation spec that the modules' docstrings cite.
"""
