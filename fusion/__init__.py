"""Fusion in the shared basis: ``fuse`` (methods by name), dense ``merge``, PEFT LoRA export/import.

    from fusion import fuse
    fused = fuse([math, code], [0.7, 0.3], basis, method="ties", density=0.3)

Names are imported lazily so that ``specfuse --help`` (which imports ``fusion.cli``) does
not pull in torch.
"""

import sys
import types
from importlib import import_module

_EXPORTS = {
    "fuse": "fuse",
    "METHODS": "methods",
    "get_method": "methods",
    "merge_into_model": "merge",
    "merge_model_dir": "merge",
    "export_peft_lora": "lora_io",
    "import_peft_lora": "lora_io",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)


class _Package(types.ModuleType):
    # ``fusion.fuse`` is both a submodule and the function it defines: importing the
    # submodule binds the module as the package attribute, so the function is served by
    # a property that the import system's binding cannot replace.
    @property
    def fuse(self):
        return import_module(f"{__name__}.fuse").fuse

    @fuse.setter
    def fuse(self, value) -> None:
        pass


sys.modules[__name__].__class__ = _Package
