"""The one error type of `l2c.eval`: inputs that cannot be evaluated as given."""

from l2c.errors import L2CError


class EvalError(L2CError, ValueError):
    """Missing or duplicate keys, a cache that does not fit the model, unusable images or classes."""
