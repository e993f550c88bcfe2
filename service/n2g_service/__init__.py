"""n2g service: the N2G pipeline (dataset scan, pruning, saliency, augmentation, graph fitting,
evaluation) over TransformerLens 4 models, and the server on top of it.

Modules, lowest first: ``config``, ``models``, ``corpus`` -> ``activations`` -> ``scan``, ``fit``,
``evaluate``. Importing the package is cheap; torch and TransformerLens load with the modules that
need them.
"""

__version__ = "0.1.0"
