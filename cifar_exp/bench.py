"""`python -m cifar_exp.bench`: the throughput benchmark (cifar_exp.tools.bench)."""

from cifar_exp.tools.bench import main

if __name__ == "__main__":
    main()
