"""The project's error types: every bad input surfaces as one of these, naming its file, case or key."""


class VfmAlignError(Exception):
    """Base class of every error vfm-align raises on purpose."""


class CheckpointError(VfmAlignError):
    """A checkpoint file is unreadable, unsafe, or not in a format we know."""


class ConversionError(VfmAlignError):
    """Weights do not fit the architecture: missing, unexpected or mis-shaped keys."""


class DataError(VfmAlignError):
    """An image, mask, manifest or feature bank is malformed."""


class ConfigError(VfmAlignError):
    """A configuration value is invalid or inconsistent."""


class Stopped(VfmAlignError):
    """A run left early because a concurrent run failed or the work was interrupted."""
