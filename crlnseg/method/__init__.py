"""The CRLN method (paper Sec. 3-4 and METHOD.md), pure torch, no file I/O."""
