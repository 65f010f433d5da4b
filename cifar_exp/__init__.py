"""cifar_exp: Hydra-configured, MLflow-tracked PyTorch experiments on CIFAR-10/100."""

__version__ = "0.1.0"
