"""An example model for cifar_exp, kept outside it.

Nothing is imported here: Hydra reads this package's conf/ folder on every command
(`--help` and Tab completion too), and torch would slow each of them down."""
