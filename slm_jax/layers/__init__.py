"""Building blocks shared by every model in slm-jax (one layers/ folder, MaxText style)."""
