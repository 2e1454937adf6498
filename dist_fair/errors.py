"""Exceptions raised on bad input. Every message names the file, sample or field and the fix."""


class DistFairError(Exception):
    """Base class: the CLI prints these as one-line errors instead of a traceback."""


class ConfigError(DistFairError, ValueError):
    """A configuration value is invalid (names the dotted field and what is allowed)."""


class ShardError(DistFairError, ValueError):
    """A shard or its manifest is missing, corrupt or inconsistent (names shard and sample)."""


class DataError(DistFairError, ValueError):
    """Input arrays are malformed: wrong shape, NaN, unknown group, wrong length..."""


class InfeasibleError(DistFairError, ValueError):
    """A constrained problem (fair assignment targets) has no solution; says which constraint."""
