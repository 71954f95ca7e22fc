"""The networks that models and guides are built from.

- :mod:`.mlp`: a multilayer perceptron and the Gaussian encoder head, for vector data and the
  layers between stochastic layers;
- :mod:`.conv`: strided-convolution encoders and transposed-convolution decoders for images;
- :mod:`.architecture`: which of the two a model and its guide are built from.

Kept in one place so that every guide (Gaussian, mixture, flow) reuses the same encoder trunk,
and every decoder the same networks.
"""

from elbolab.nn.architecture import ARCHITECTURES, Architecture
from elbolab.nn.conv import ConvDecoder, ConvEncoder, ConvGridDecoder
from elbolab.nn.mlp import ACTIVATIONS, GaussianEncoder, mlp, trunk_width

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "Architecture",
    "ConvDecoder",
    "ConvEncoder",
    "ConvGridDecoder",
    "GaussianEncoder",
    "mlp",
    "trunk_width",
]
