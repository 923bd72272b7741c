"""Training machinery shared by every method: loop, checkpoints, optimiser, schedule, processes."""
