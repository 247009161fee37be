"""ensdiv: ensembles whose members disagree where it matters.

Train diverse ensembles (gradient-diversity regularizers), measure transferability and the
Gradient Diversity Rating (GDR), detect and certify. Inputs are float images in [0, 1], NCHW;
every model normalizes inside itself.
"""

__version__ = "0.1.0"
