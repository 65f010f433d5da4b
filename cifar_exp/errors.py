"""Errors that reach the user as one line: what is wrong and how to fix it."""


class UserError(Exception):
    """Bad input (config, data, environment) that the user can fix; printed without traceback."""


class DataError(UserError):
    """A data set that is missing, incomplete or not CIFAR."""


class ConfigError(UserError):
    """A configuration value that cannot work."""
