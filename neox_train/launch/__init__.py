"""`neox-launch`: hostfiles, the memory planner, pre-flight checks, the deepspeed command line."""
