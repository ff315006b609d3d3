"""The original script, as the README lenet-dist grew out of describes it: the benchmark's baseline.

LeNet-5, torchvision's MNIST with ToTensor and Normalize (batch 64, shuffled), Adam (lr 1e-3), 2 epochs,
the test accuracy after each, then a figure of predictions; plain PyTorch. It only also times itself and
saves the figure instead of showing it:

    python -m lenet_dist.bench.original --data-dir DIR --summary out.json --figure out.png
"""

from __future__ import annotations

import argparse
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from lenet_dist.model import LeNet5  # noqa: E402  (the same architecture the original script defines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--summary", required=True, help="where to write the timings as JSON")
    parser.add_argument("--figure", required=True, help="where to save the predictions figure")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = datasets.MNIST(args.data_dir, train=True, download=False, transform=transform)
    test_set = datasets.MNIST(args.data_dir, train=False, download=False, transform=transform)
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=1000, shuffle=False)

    model = LeNet5()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)

    started = time.perf_counter()
    epochs = []
    for epoch in range(args.epochs):
        model.train()
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test_loader:
                correct += (model(images).argmax(dim=1) == labels).sum().item()
        accuracy = correct / len(test_set)
        epochs.append({"epoch": epoch + 1, "test_accuracy": accuracy, "elapsed_seconds": time.perf_counter() - started})
        print(f"Epoch {epoch + 1}, Accuracy: {100 * accuracy:.2f}%")

    images, labels = next(iter(test_loader))
    with torch.no_grad():
        predicted = model(images[:10]).argmax(dim=1)
    figure, axes = plt.subplots(2, 5, figsize=(10, 5))
    for axis, image, guess, truth in zip(axes.flat, images, predicted, labels, strict=False):
        axis.imshow(image.squeeze(), cmap="gray")
        axis.set_title(f"Pred: {guess.item()}, True: {truth.item()}")
        axis.axis("off")
    plt.savefig(args.figure)

    with open(args.summary, "w") as summary:
        json.dump({"epochs": epochs, "train_images": len(train_set)}, summary)


if __name__ == "__main__":
    main()
