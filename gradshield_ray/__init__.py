"""gradshield_ray: GradShield's FIHS scoring and adaptive threshold as a data-pipeline step."""
__version__ = "0.1.0"
