"""The adapter registry: a SQL catalog of named, versioned adapters over a content-addressed blob store.

    from adapters_zoo.registry import Registry, parse_mixture
    reg = Registry()                      # $SPECFUSE_HOME, else ~/.specfuse
    reg.add_basis(basis)                  # declare the base model first
    rec = reg.add("math.safetensors", "math", tags=["skill"])
    adapter = reg.load("math@1")          # hash-verified, validated against its basis
    resolve(reg, "math:0.7,code:0.3")    # a Mixture: (name@version, weight, sha256) per adapter

Names are imported lazily so that ``specfuse --help`` (which imports ``registry.cli``)
does not pull in torch.
"""

from importlib import import_module

_EXPORTS = {
    "AdapterRecord": "catalog",
    "MAX_MIXTURE": "mixture",
    "check_mixture": "mixture",
    "mixture_pairs": "mixture",
    "parse_mixture": "mixture",
    "parse_ref": "names",
    "validate_name": "names",
    "validate_tag": "names",
    "validate_version": "names",
    "Registry": "registry",
    "basis_for_model": "model_basis",
    "default_home": "registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
