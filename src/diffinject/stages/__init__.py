"""Stage LightningModules, importable by short class name from the CLI configs."""

from diffinject.stages.a2_adapt import A2Adaptation as A2Adaptation
from diffinject.stages.a2_source import A2SourceGAN as A2SourceGAN
from diffinject.stages.a2_translate import A2Translate as A2Translate
from diffinject.stages.amplibias import AmpliBiasGAN as AmpliBiasGAN
from diffinject.stages.amplibias_generate import AmpliBiasGenerate as AmpliBiasGenerate
from diffinject.stages.classifiers import BiasClassifier as BiasClassifier
from diffinject.stages.classifiers import VanillaClassifier as VanillaClassifier
from diffinject.stages.debias import DebiasClassifier as DebiasClassifier
from diffinject.stages.diffusion import P2DiffusionModule as P2DiffusionModule
from diffinject.stages.disent import DisEntClassifier as DisEntClassifier
from diffinject.stages.inject import InjectionPredictModule as InjectionPredictModule
from diffinject.stages.lff import LfFClassifier as LfFClassifier
