"""Built-in `specdec bench` configs (TOML). `specdec bench --preset NAME`."""
