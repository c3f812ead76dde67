"""The long-running camera service: frame sources, capture, scoring worker, ZeroMQ publishing."""
