"""Statistics: divergences in nats, bootstrap intervals, grids of per-layer values."""
