"""Building blocks shared by model families: activations, norms, residual joins,
positional embeddings and the feed-forward sublayer. Each option kind has a
registry (a dict) keyed by name; the seed's numbers map onto those names."""
from raygen.models.layers.activations import (ACTIVATION_NUMBERS, ACTIVATIONS, INITS, activation_name, init_linear,
                                              make_activation)
from raygen.models.layers.feedforward import FeedForward
from raygen.models.layers.norms import NORM_NUMBERS, NORMS, SeqNorm, make_norm, norm_name
from raygen.models.layers.positional import (POSITIONAL, POSITIONAL_NUMBERS, PositionalEmbedding, Rotary, alibi_slopes,
                                             make_positional, sinusoidal_table)
from raygen.models.layers.residual import (RESIDUAL_NUMBERS, RESIDUALS, Branch, DropPath, LayerScale, make_residual,
                                           residual_name)

__all__ = [
    "ACTIVATIONS", "ACTIVATION_NUMBERS", "INITS", "activation_name", "init_linear", "make_activation",
    "FeedForward",
    "NORMS", "NORM_NUMBERS", "SeqNorm", "make_norm", "norm_name",
    "POSITIONAL", "POSITIONAL_NUMBERS", "PositionalEmbedding", "Rotary", "alibi_slopes", "make_positional",
    "sinusoidal_table",
    "RESIDUALS", "RESIDUAL_NUMBERS", "Branch", "DropPath", "LayerScale", "make_residual", "residual_name",
]
