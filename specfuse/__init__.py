"""specfuse's public Python API: train spectral adapters inside the ecosystem's trainers.

    import specfuse
    basis = specfuse.basis_from_model(model, rank=32)
    model = specfuse.prepare_for_training(model, basis, kind="scale", rank=32)
    ... transformers.Trainer / trl.SFTTrainer / your own loop ...
    specfuse.save_trained(model, "task.safetensors", tokenizer=tokenizer, prompts=prompts)
"""

from adapters_zoo.basis import basis_from_model, compute_basis, load_basis, save_basis
from adapters_zoo.format import load_adapter
from adapters_zoo.trainer_api import prepare_for_training, save_trained, trainable_parameters

__all__ = [
    "basis_from_model",
    "compute_basis",
    "load_adapter",
    "load_basis",
    "prepare_for_training",
    "save_basis",
    "save_trained",
    "trainable_parameters",
]
