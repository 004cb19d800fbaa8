"""The port's error: what cannot be ported, or a ported module called where its trace
does not hold. Depends on nothing."""


class PortError(ValueError):
    """A model could not be ported, or a ported module was called at shapes its trace does
    not cover; the message says why and the fix."""

    __module__ = "jaxbn.port"  # (where users catch it, and tracebacks name it)
