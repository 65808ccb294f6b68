"""FlyThinker worker package: the joint model, paired decoding, and (in submodules that import verl/ray)
the distributed workers. Importing this package pulls torch + transformers only."""

from .decoding import GenerateOutput, PairedDecoder, sample_next
from .model import FlyThinker, FlyThinkerOutput, Positions, Projection
from .tiny import load_tiny_tokenizer, tiny_pair

__all__ = ["FlyThinker", "FlyThinkerOutput", "GenerateOutput", "PairedDecoder", "Positions", "Projection",
           "load_tiny_tokenizer", "sample_next", "tiny_pair"]
