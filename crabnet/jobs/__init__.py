"""The jobs wing: the Dask engine, torch.distributed, signal handling and the shared command line.

It imports no other wing."""
