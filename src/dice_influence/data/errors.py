"""The data layer's user-facing error."""


class DataError(ValueError):
    """A dataset, partition, corruption or schedule request that cannot be honoured."""
