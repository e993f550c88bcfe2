"""n2g service: the N2G pipeline (dataset scan, pruning, saliency, augmentation, graph fitting,
evaluation) over TransformerLens 4 models, and the server on top of it.

Modules, lowest first: ``config``, ``models``, ``corpus`` -> ``activations`` -> ``scan``, ``fit``,
``evaluate``. Importing the package is cheap; torch and TransformerLens load with the modules that
need them.
"""

from n2g import __version__  # one version for the client, the service and pyproject.toml
