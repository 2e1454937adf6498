"""dist_fair: fair clustering of million-scale face data sets.

Ray orchestrates, DeepSpeed trains, FAISS searches and WebDataset shards carry the data; the
algorithms are specified in METHODS.md. Importing this package is cheap: heavy dependencies are
imported by the stages that need them.
"""
__version__ = "0.1.0"

__all__ = ["__version__"]
