"""The harness's Hydra launcher plugin (Hydra finds plugins only in the `hydra_plugins` namespace package)."""
