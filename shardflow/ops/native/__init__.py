"""Native CPU kernels: C sources in ``csrc/``, built on first use by :mod:`.build`, called
through ctypes. Each module here holds a kernel's ctypes signatures and its Python entry points;
none holds C source."""
