import os

# Tests run on the CPU; keep XLA from grabbing every core for itself per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
