"""deepres: train very deep Highway networks, ResNets and LSTMs."""

__version__ = "0.1.0"
