"""Hydra configs of slsam-train (a package so that Hydra finds them inside the installed wheel)."""
