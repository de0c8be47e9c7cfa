"""Every exception anonloader raises on purpose.

    AnonloaderError
    ├── ConfigError                 a setting is invalid or inconsistent
    ├── InputError                  a sample (or its annotations) cannot be used as it is
    │   ├── ImageDecodeError        corrupt, truncated or non-image bytes
    │   ├── ImageTooLargeError      more pixels than PIL's Image.MAX_IMAGE_PIXELS (decompression bomb)
    │   ├── UnsupportedImageError   zero-size, ambiguous channels, 16-bit, wrong dtype or range
    │   └── AnnotationError         annotated boxes / landmarks non-finite, outside the image, normalised
    ├── ModelLoadError              weights missing, unreadable, or would need a download
    ├── DetectionError              the detector failed on an image
    ├── AlignmentError              a face could not be warped to a crop
    ├── MethodError                 the anonymization method failed on a crop
    ├── AnonymizationFailed         fail-closed policy "raise": a face could not be anonymized
    ├── IdentityError               identity keys, mapping, banks
    │   └── SecretError             missing or wrong secret for a keyed mapping
    └── CacheError                  the anonymized cache
        ├── CacheMissError          read-only cache does not hold requested samples
        ├── CacheCorruptError       an entry's checksum does not match its bytes
        └── CacheFingerprintError   the cache was written by another pipeline

Messages name the sample (index or file) and say what to do. They never contain a secret.
"""

from __future__ import annotations

__all__ = [
    "AlignmentError",
    "AnnotationError",
    "AnonloaderError",
    "AnonymizationFailed",
    "CacheCorruptError",
    "CacheError",
    "CacheFingerprintError",
    "CacheMissError",
    "ConfigError",
    "DetectionError",
    "IdentityError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "InputError",
    "MethodError",
    "ModelLoadError",
    "SecretError",
    "UnsupportedImageError",
]


class AnonloaderError(Exception):
    """Base of every error anonloader raises on purpose."""


class ConfigError(AnonloaderError, ValueError):
    """A setting is invalid, unknown or inconsistent with another."""


class InputError(AnonloaderError, ValueError):
    """A sample cannot be used as it is.

    Attributes:
        index: the sample's position in its dataset, when known.
        source: the file or shard it came from, when known.
        field: where in the sample, e.g. ``"['views'][1]"``, when known.
    """

    def __init__(self, message: str, *, index: int | None = None, source: str | None = None, field: str | None = None):
        where = []
        if index is not None:
            where.append(f"sample {index}")
        if source is not None:
            where.append(str(source))
        if field:
            where.append(f"field {field}")
        prefix = f"{' / '.join(where)}: " if where else ""
        super().__init__(prefix + message)
        self.index = index
        self.source = source
        self.field = field


class ImageDecodeError(InputError):
    """Corrupt, truncated or non-image bytes."""


class ImageTooLargeError(InputError):
    """An encoded image with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (a possible
    decompression bomb); it is refused before it is decoded."""


class UnsupportedImageError(InputError):
    """An image of a shape, channel count, bit depth, dtype or value range anonloader cannot take."""


class AnnotationError(InputError):
    """A sample's annotated boxes or landmarks are malformed, non-finite, outside the image or
    in the wrong units."""


class ModelLoadError(AnonloaderError, OSError):
    """Model weights are missing, unreadable, or would need a download the user did not allow."""


class DetectionError(AnonloaderError, RuntimeError):
    """The face detector failed on an image."""


class AlignmentError(AnonloaderError, RuntimeError):
    """A face could not be warped to or from its aligned crop."""


class MethodError(AnonloaderError, RuntimeError):
    """An anonymization method failed on a batch of crops."""


class AnonymizationFailed(AnonloaderError, RuntimeError):
    """A face could not be anonymized and the policy is ``on_error="raise"`` (fail closed)."""


class IdentityError(AnonloaderError, RuntimeError):
    """Identity keys, the keyed mapping or a synthetic identity bank failed."""


class SecretError(IdentityError):
    """The secret for a keyed mapping is missing or does not match the stored mapping."""


class CacheError(AnonloaderError, RuntimeError):
    """The anonymized LMDB cache failed."""


class CacheMissError(CacheError):
    """A read-only cache does not hold samples that were asked for."""


class CacheCorruptError(CacheError):
    """An entry's checksum does not match its bytes; it is never served."""


class CacheFingerprintError(CacheError):
    """The cache was written by a pipeline with another fingerprint."""
