"""rtdlm: JAX-native token sampling, decode loops and lossless speculative decoding."""

__version__ = "0.1.0"
