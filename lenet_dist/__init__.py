"""lenet-dist: LeNet-5 on MNIST, trained through Hugging Face accelerate on any number of devices."""

__version__ = "0.1.0"
