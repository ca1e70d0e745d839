"""Lightning callbacks and logging helpers (prediction writers, image grids)."""

from diffinject.callbacks.console import PlainProgress as PlainProgress
from diffinject.callbacks.injection_check import InjectionCheck as InjectionCheck
from diffinject.callbacks.sample_quality import SampleQualityMonitor as SampleQualityMonitor
from diffinject.callbacks.samples import image_grid as image_grid
from diffinject.callbacks.samples import log_image_grid as log_image_grid
from diffinject.callbacks.synthetic_writer import SyntheticImageWriter as SyntheticImageWriter
from diffinject.callbacks.topk import TopKWriter as TopKWriter
