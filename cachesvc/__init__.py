"""cachesvc: a disaggregated KV-cache storage service (server side).

Importing this package is cheap and never imports torch; see docs/design.md.
"""

__version__ = "0.1.0"
