"""dist_soup: distributed multi-objective training with compressed gradient communication."""

__version__ = "0.1.0"
