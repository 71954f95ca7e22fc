"""The networks that models and guides are built from.

- :mod:`.mlp`: a multilayer perceptron and the Gaussian encoder head, for vector data and the
  layers between stochastic layers;
- :mod:`.conv`: strided-convolution encoders and transposed-convolution decoders for images.

Kept in one place so that every guide (Gaussian, mixture, flow) reuses the same encoder trunk,
and every decoder the same networks.
"""

from elbolab.nn.mlp import ACTIVATIONS, GaussianEncoder, mlp

__all__ = ["ACTIVATIONS", "GaussianEncoder", "mlp"]
