"""sdcli: Stable Diffusion from the command line, pixel-exact with the reference implementation."""

__version__ = "0.1.0"
