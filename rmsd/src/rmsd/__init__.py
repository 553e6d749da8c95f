"""rmsd: the RMS node software (root and licensing clusters, cluster keys, licenses)."""

__version__ = "0.2.0"
