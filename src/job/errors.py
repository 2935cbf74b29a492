"""Errors that mean "fix this setting", shared by the driver and the workers.

Kept free of heavy imports so the driver can catch them without loading torch.
"""


class WeightsError(RuntimeError):
    """The configured weights cannot be loaded; the message says what to pass instead."""
