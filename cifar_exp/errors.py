"""Errors that reach the user as one line: what is wrong and how to fix it."""


class UserError(Exception):
    """Bad input (config, data, environment) that the user can fix; printed without traceback."""


class DataError(UserError):
    """A data set that is missing, incomplete or not CIFAR."""


class ConfigError(UserError):
    """A configuration value that cannot work."""


class NonFiniteLoss(Exception):
    """Training diverged: the loss became inf or nan at `step`."""

    def __init__(self, step: int, loss: float, lr: float) -> None:
        super().__init__(f"loss became {loss} at step {step} (lr {lr:g}); training stopped, "
                         f"the run is marked FAILED: try a lower optimizer.lr")
        self.step, self.loss, self.lr = step, loss, lr


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, untrusted, or from another run."""
