"""One module per CLI subcommand; see ``deepseek_jax.cli``."""
