"""Networks: classifiers and UNet presets."""

from diffinject.nets.classifiers import DisEntNet as DisEntNet
from diffinject.nets.classifiers import build_classifier as build_classifier
from diffinject.nets.unet import UNET_PRESETS as UNET_PRESETS
from diffinject.nets.unet import build_unet as build_unet
