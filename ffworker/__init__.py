"""ffworker: a self-hosted media job service running ffmpeg work behind a REST API."""

__version__ = "0.1.0"
