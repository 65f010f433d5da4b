"""cifar_exp's Hydra sweeper for Optuna (Hydra finds plugins in the hydra_plugins package)."""
