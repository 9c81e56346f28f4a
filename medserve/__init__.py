"""medserve: an on-premise, privacy-preserving inference server for medical LLMs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
