"""`python -m diffinject.data export …`: write a dataset in the DisEnt folder layout.

Examples:
    python -m diffinject.data export cmnist --ratio 0.01 --out data/
    python -m diffinject.data export ccifar10 --ratio 0.01 --root data --out data/   # builds the cache
    python -m diffinject.data export bffhq --root downloads --pct 0.5pct --out data/
    python -m diffinject.data export folder --root downloads --name bar --pct 1pct --num-classes 6 --out data/
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from diffinject.data.base import BiasedDataModule
from diffinject.data.ccifar10 import CCIFAR10DataModule
from diffinject.data.cmnist import CMNISTDataModule
from diffinject.data.datasets import BadImageError
from diffinject.data.export import export_datamodule
from diffinject.data.folder import BFFHQDataModule, DogsCatsDataModule, FolderDataModule


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffinject.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a dataset in the folder layout")
    datasets = export.add_subparsers(dest="dataset", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = datasets.add_parser(name, help=help_text)
        sub.add_argument(
            "--out", required=True, help="output root; writes {out}/{name}/{pct} and {out}/{name}/test"
        )
        sub.add_argument("--root", default="data", help="where the source data lives (default: data)")
        sub.add_argument("--seed", type=int, default=0, help="data seed (default: 0)")
        sub.add_argument("--overwrite", action="store_true", help="replace existing output folders")
        sub.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for decoding")
        sub.add_argument("--on-bad-image", choices=("error", "skip"), default="error")
        return sub

    cmnist = add("cmnist", "Colored MNIST (LfF protocol)")
    cmnist.add_argument("--ratio", default="0.01", help="conflicting fraction, e.g. 0.01 or 1pct")
    cmnist.add_argument("--source", choices=("auto", "embedded", "torchvision", "folder"), default="auto")
    cmnist.add_argument("--color-std", type=float, default=0.005)
    cmnist.add_argument("--val-fraction", type=float, default=0.1)
    cmnist.add_argument("--download", action="store_true", help="allow torchvision to download MNIST")

    ccifar = add("ccifar10", "Corrupted CIFAR-10 (LfF Type0, built from CIFAR-10 under --root)")
    ccifar.add_argument("--ratio", default="0.01", help="conflicting fraction, e.g. 0.01 or 1pct")
    ccifar.add_argument("--source", choices=("auto", "folder", "torchvision"), default="auto")
    ccifar.add_argument("--severity", type=int, default=5)
    ccifar.add_argument("--val-fraction", type=float, default=0.1)
    ccifar.add_argument("--download", action="store_true", help="allow torchvision to download CIFAR-10")

    for name, pct in (("bffhq", "0.5pct"), ("dogscats", "1pct")):
        preset = add(name, f"{name} folder dataset (re-export, resized to --image-size)")
        preset.add_argument("--pct", default=pct)
        preset.add_argument("--image-size", type=int, default=224)

    folder = add("folder", "any DisEnt-layout folder dataset (re-export)")
    folder.add_argument("--name", required=True)
    folder.add_argument("--pct", required=True)
    folder.add_argument("--image-size", type=int, required=True)
    folder.add_argument("--num-classes", type=int, required=True)
    folder.add_argument("--channels", type=int, default=3)
    return parser


def _datamodule(args: argparse.Namespace) -> BiasedDataModule:
    common = {"root": args.root, "seed": args.seed, "on_bad_image": args.on_bad_image}
    if args.dataset == "cmnist":
        return CMNISTDataModule(
            ratio=args.ratio,
            source=args.source,
            color_std=args.color_std,
            val_fraction=args.val_fraction,
            download=args.download,
            **common,
        )
    if args.dataset == "ccifar10":
        return CCIFAR10DataModule(
            ratio=args.ratio,
            source=args.source,
            severity=args.severity,
            val_fraction=args.val_fraction,
            download=args.download,
            augment=False,
            **common,
        )
    if args.dataset == "bffhq":
        return BFFHQDataModule(pct=args.pct, image_size=args.image_size, augment=False, **common)
    if args.dataset == "dogscats":
        return DogsCatsDataModule(pct=args.pct, image_size=args.image_size, augment=False, **common)
    return FolderDataModule(
        name=args.name,
        pct=args.pct,
        image_size=args.image_size,
        num_classes=args.num_classes,
        channels=args.channels,
        augment=False,
        **common,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        datamodule = _datamodule(args)
        out = export_datamodule(datamodule, args.out, overwrite=args.overwrite, num_workers=args.num_workers)
    except (OSError, ValueError, BadImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
