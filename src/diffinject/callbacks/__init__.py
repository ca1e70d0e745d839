"""Lightning callbacks: prediction writers, the injection check, sample quality and console progress."""

from diffinject.callbacks.console import PlainProgress as PlainProgress
from diffinject.callbacks.injection_check import InjectionCheck as InjectionCheck
from diffinject.callbacks.sample_quality import SampleQualityMonitor as SampleQualityMonitor
from diffinject.callbacks.synthetic_writer import SyntheticImageWriter as SyntheticImageWriter
from diffinject.callbacks.topk import TopKWriter as TopKWriter
