"""The ``nn.Module`` layer: ``estimate`` for a model on its data, and the evaluators of its cost (``costs``)."""
