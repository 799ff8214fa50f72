"""SeqIO tasks and mixtures (installed as slm_jax.tasks)."""
