"""The one exception a configuration raises, in a module of its own: the model, the data modules and the entry points
all raise it, and an entry point turns it into a one-line message. Depending on it ties nobody to the mixer
contract."""


class ConfigError(ValueError):
    """A configuration that cannot be built; the message says how to fix it."""
