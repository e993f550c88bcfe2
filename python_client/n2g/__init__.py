"""n2g: the Python client library and the `n2g` command line for the n2g neuron-graph service.

The client needs only grpcio, grpcio-health-checking, protobuf, googleapis-common-protos (a busy server's retry
hint) and numpy; the command line's local and `serve` commands
import the service (torch, TransformerLens) lazily.
"""

__version__ = "0.1.0"
