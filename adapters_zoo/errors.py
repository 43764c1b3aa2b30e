"""Typed errors shared by every layer of specfuse.

Each error is a class, never a message to parse: the HTTP layer maps classes to status
codes in one handler and the CLI prints ``str(err)`` as its one line.
"""


class SpecfuseError(Exception):
    """Base class of every error specfuse raises on purpose."""


class InvalidConfig(SpecfuseError, ValueError):
    """A kind or method parameter is missing, of the wrong type, or out of range."""


class UnknownKind(InvalidConfig):
    """An adapter kind name that no module registers."""


class AdapterFormatError(SpecfuseError, ValueError):
    """An adapter or basis file that is truncated, corrupt, foreign or inconsistent."""


class IncompatibleAdapter(SpecfuseError, ValueError):
    """An adapter that does not belong to the basis / base model it is used with."""


class BasisMismatch(IncompatibleAdapter):
    """A basis whose fingerprint or shapes do not match the model it is used with."""


class ModelDirError(SpecfuseError, ValueError):
    """A model directory without a readable config or safetensors weights."""


class TrainingDataError(SpecfuseError, ValueError):
    """A training file that is missing, empty or malformed."""


class AdapterNotFound(SpecfuseError, KeyError):
    """A name (or name@version) that the registry does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "adapter not found"


class RegistryError(SpecfuseError):
    """A registry operation that cannot be done (bad name, tampered blob, missing basis)."""


class IntegrityError(RegistryError):
    """A stored blob whose sha256 no longer matches its catalog record."""


class InvalidMixture(SpecfuseError, ValueError):
    """A mixture string or weight map that cannot be parsed or is out of bounds."""


class DeltaOutOfBounds(SpecfuseError, ValueError):
    """An adapter or fused mixture whose change to a layer is past the bound set from the base's spectrum."""


class TrainingDiverged(SpecfuseError):
    """Training produced a non-finite loss (learning rate too high, or bad data)."""


class InvalidName(RegistryError, ValueError):
    """An adapter name, version or tag that is empty, too long or has characters outside [A-Za-z0-9._-]."""


class AdapterExists(RegistryError):
    """An explicit name@version that the registry already holds."""


class BaseNotDeclared(RegistryError):
    """An adapter (or a basis lookup) whose base model has no basis in the registry."""


class InvalidRequest(SpecfuseError, ValueError):
    """A serving request with a bad or out-of-bounds value; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PayloadTooLarge(InvalidRequest):
    """A prompt, body or upload past the server's size bound."""


class Unauthorized(SpecfuseError):
    """A request without the bearer token the server was started with."""


class ServerBusy(SpecfuseError):
    """The request queue is full; the client may retry later."""


class ServiceUnavailable(SpecfuseError):
    """The engine is stopped or failed; nothing can be generated right now."""


class NumericalFailure(SpecfuseError):
    """A request whose logits became NaN or infinite; it alone is ended, the batch goes on."""


class DistributedError(SpecfuseError, RuntimeError):
    """A collective that failed or timed out: another rank died or stopped answering."""
