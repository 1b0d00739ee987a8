"""The one error of the conversion."""


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message says what and why."""
