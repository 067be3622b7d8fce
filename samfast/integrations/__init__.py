"""samfast with training frameworks: ``samfast.integrations.lightning`` (PyTorch Lightning 2.x)
and ``samfast.integrations.accelerate`` (Hugging Face Accelerate and the ``transformers``
Trainer). Import them by name; ``import samfast`` never imports a framework
(``pip install samfast[lightning]`` / ``samfast[accelerate]`` installs one)."""
