"""Entry points, one per role (console scripts in setup.cfg), and the local cluster."""
