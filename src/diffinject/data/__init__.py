"""Biased image datasets as LightningDataModules (items: image, label, bias, index dicts).

One re-export per line (`X as X` marks it public), so each module adds its own line.
"""

from diffinject.data.base import BiasedDataModule as BiasedDataModule
from diffinject.data.ccifar10 import CCIFAR10DataModule as CCIFAR10DataModule
from diffinject.data.cmnist import CMNISTDataModule as CMNISTDataModule
from diffinject.data.folder import BFFHQDataModule as BFFHQDataModule
from diffinject.data.folder import DogsCatsDataModule as DogsCatsDataModule
from diffinject.data.folder import FolderDataModule as FolderDataModule
from diffinject.data.pairs import InjectionPairsDataModule as InjectionPairsDataModule
from diffinject.data.topk_images import GeneratorSamplesDataModule as GeneratorSamplesDataModule
from diffinject.data.topk_images import TopKImagesDataModule as TopKImagesDataModule
