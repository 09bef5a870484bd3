"""Running training on several processes: launching torchrun workers, process groups, parallelism."""
