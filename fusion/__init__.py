"""Fusion in the shared basis: ``fuse`` (methods by name), dense ``merge``, PEFT LoRA export/import.

    from fusion.fuse import fuse
    fused = fuse([math, code], [0.7, 0.3], basis, method="ties", density=0.3)

The package imports nothing itself, so that ``specfuse --help`` (which imports ``fusion.cli``)
does not pull in torch; import from the submodules: ``fusion.fuse``, ``fusion.methods``,
``fusion.merge``, ``fusion.lora_io``.
"""
