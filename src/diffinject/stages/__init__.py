"""Stage LightningModules, importable by short class name from the CLI configs."""

from diffinject.stages.classifiers import BiasClassifier as BiasClassifier
from diffinject.stages.classifiers import VanillaClassifier as VanillaClassifier
from diffinject.stages.debias import DebiasClassifier as DebiasClassifier
from diffinject.stages.diffusion import P2DiffusionModule as P2DiffusionModule
from diffinject.stages.disent import DisEntClassifier as DisEntClassifier
from diffinject.stages.inject import InjectionPredictModule as InjectionPredictModule
from diffinject.stages.lff import LfFClassifier as LfFClassifier
