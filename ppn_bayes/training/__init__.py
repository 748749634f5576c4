"""SVI jointly with the weights: the session, the loop, LoRA, checkpoints, data parallel, held-out evaluation, and the run directory format the loop writes."""
