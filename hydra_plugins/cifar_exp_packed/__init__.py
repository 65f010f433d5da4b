"""cifar_exp's Hydra launcher that packs a sweep's jobs onto one device: hydra/launcher=packed."""
