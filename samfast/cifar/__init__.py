"""CIFAR reference models, data and trainer."""
