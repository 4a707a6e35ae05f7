"""Robust architecture search (AdvRush, paper 003): a DARTS supernet whose architecture parameters are
pushed towards a smooth input loss landscape, and the discrete networks its genotypes describe."""

from .genotype import FORMAT, Genotype, GenotypeError, discretise, load_genotype, parse_genotype
from .network import SearchedNetwork
from .supernet import MixedEdge, Supernet

__all__ = ["FORMAT", "Genotype", "GenotypeError", "MixedEdge", "SearchedNetwork", "Supernet", "discretise",
           "load_genotype", "parse_genotype"]
