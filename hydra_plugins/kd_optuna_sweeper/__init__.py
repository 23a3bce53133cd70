"""Hydra discovers sweeper plugins only inside the `hydra_plugins` namespace package; the search itself lives in
kd_lightning/sweeps/search.py."""
