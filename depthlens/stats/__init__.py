"""Statistics: divergences in nats, per-layer scores against a reference (eager or compiled),
bootstrap intervals, grids of per-layer values."""
