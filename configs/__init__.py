"""Training configs as TOML files: `fast.toml` and one recipe per zoo model (`<model>.toml`).

`flaxzoo train --config NAME` reads `NAME.toml` from here; `--config PATH.toml` reads any file.
"""
