"""Measures: pure functions that turn models, images and predictions into numbers.

- `metrics`: accuracies (overall, aligned/conflicting, per group, worst class) and the label-free
  pseudo-balanced validation score the selection rule reads;
- `sample_quality`: recognised / palette-close / Fréchet figures of unconditional samples;
- `injection_check`: the label-free checks of a synthetic set (bias moved, content retained, the premise's
  second view);
- `synthetic_set`: what a synthetic set contains (colour, shape probe, recombination, diversity), for the
  report and the benchmarks.

Stages, callbacks, the report and the benchmarks import from here; nothing here imports them.
"""
