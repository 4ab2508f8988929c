"""rtdlm: JAX-native token sampling, decode loops and lossless speculative decoding.

Subpackages: `rtdlm.sampling` (configs, processors, filters, `sample`), `rtdlm.decoding`
(`generate` and the speculative decoders), `rtdlm.models` (the bundled model), and
`rtdlm.constraints` where present. `import rtdlm; rtdlm.sampling` works: subpackages load
on first use, so `python -m rtdlm --help` does not import JAX.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("sampling", "decoding", "models", "guide", "sharding", "constraints")


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"rtdlm.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBPACKAGES])
