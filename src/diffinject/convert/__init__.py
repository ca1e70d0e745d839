"""Converters from external diffusion checkpoints into the diffusion export folder the inject stage reads.

`adm`: OpenAI guided-diffusion ("ADM") UNets as released by P2 weighting and ILVR (pure config + weight
mapping); `checkpoint`: safe loading and export writing; `cli`: `diffinject-convert adm CKPT --out DIR`.
"""

from diffinject.convert.adm import ADM_PRESETS as ADM_PRESETS
from diffinject.convert.adm import ADMConfig as ADMConfig
from diffinject.convert.adm import ADMConversionError as ADMConversionError
from diffinject.convert.adm import convert_state_dict as convert_state_dict
from diffinject.convert.adm import diffusers_config as diffusers_config
from diffinject.convert.checkpoint import convert_adm_checkpoint as convert_adm_checkpoint
from diffinject.convert.checkpoint import load_adm_state_dict as load_adm_state_dict
