"""Tools around the training core: the throughput benchmark, step profiling, the
DataLoader baseline it races against, and the runs report. Nothing on the training path
imports them."""
