"""pirl_jax: PIRL (Misra & van der Maaten, CVPR 2020) in JAX/Flax."""
