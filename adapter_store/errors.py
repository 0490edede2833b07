"""Exception classes of the adapter store, one per problem a caller may handle."""

from __future__ import annotations


class AdapterStoreError(Exception):
    """Base of every error the adapter store raises on purpose."""


class AdapterNotFound(AdapterStoreError, LookupError):
    """No READY adapter answers to this reference."""


class InvalidAdapterRef(AdapterStoreError, ValueError):
    """An adapter reference is not `name` or `name:version` with a valid name."""


class BlobNotFound(AdapterStoreError, LookupError):
    """The blob store holds no blob with this digest."""


class BlobCorrupt(AdapterStoreError):
    """A blob's bytes do not hash to its digest."""


class InvalidDigest(AdapterStoreError, ValueError):
    """A string is not a lowercase hex sha256 digest."""


class AdapterValidationError(AdapterStoreError, ValueError):
    """An uploaded adapter directory was refused; the message names the problem."""


class MissingAdapterFile(AdapterValidationError):
    """The directory lacks adapter_config.json or adapter_model.safetensors."""


class PickleWeightsError(AdapterValidationError):
    """Weights are stored as pickle (.bin, .pt, or pickle bytes under another name)."""


class GitLfsPointerError(AdapterValidationError):
    """A weights file is a git-LFS pointer, not the weights themselves."""


class CorruptSafetensorsError(AdapterValidationError):
    """A safetensors file is truncated or its header is malformed."""


class AdapterConfigError(AdapterValidationError):
    """adapter_config.json is not valid JSON or has missing or ill-typed fields."""


class RankTooLargeError(AdapterValidationError):
    """A rank exceeds the deployment's configured maximum."""


class UnknownTargetModuleError(AdapterValidationError):
    """The adapter targets modules the base model lacks or that are not served."""


class ShapeMismatchError(AdapterValidationError):
    """A tensor's shape does not fit the base model's dimensions."""


class NoMatchingWeightsError(AdapterValidationError):
    """Weights name no module of the base model (the adapter would do nothing)."""


class NonFiniteWeightsError(AdapterValidationError):
    """A tensor holds NaN or infinity."""


class UnsupportedDtypeError(AdapterValidationError):
    """A tensor's dtype is not float16, bfloat16 or float32."""


class UnsupportedFeatureError(AdapterValidationError):
    """The adapter uses a feature not served yet (DoRA, modules_to_save, added tokens...)."""

    def __init__(self, feature: str, detail: str = "") -> None:
        self.feature = feature
        suffix = f": {detail}" if detail else ""
        super().__init__(f"unsupported adapter feature {feature}{suffix}")
