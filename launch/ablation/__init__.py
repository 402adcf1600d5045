"""launch/ablate.py in parts: the plan, the job scheduler and the results tables."""
