"""diffsearch: distributed test-time search for diffusion models.

The public Python API (``diffsearch.search``) is re-exported here once it exists; the CLI is a
thin layer over it.
"""

__version__ = "0.1.0"
