"""Diffusion math as pure functions: schedule, P2 weights, preprocessing, DDIM, h-space injection."""

from diffinject.diffusion.ddim import DDIMInversion as DDIMInversion
from diffinject.diffusion.ddim import Guidance as Guidance
from diffinject.diffusion.ddim import Injection as Injection
from diffinject.diffusion.ddim import ddim_generate as ddim_generate
from diffinject.diffusion.ddim import ddim_invert as ddim_invert
from diffinject.diffusion.ddim import ddim_step as ddim_step
from diffinject.diffusion.hspace import HSpaceHook as HSpaceHook
from diffinject.diffusion.hspace import box_mask as box_mask
from diffinject.diffusion.hspace import slerp_inject as slerp_inject
from diffinject.diffusion.preprocess import PREPROCESS_RULE as PREPROCESS_RULE
from diffinject.diffusion.preprocess import from_model_space as from_model_space
from diffinject.diffusion.preprocess import to_model_space as to_model_space
from diffinject.diffusion.schedule import ddim_timesteps as ddim_timesteps
from diffinject.diffusion.schedule import linear_alphas_cumprod as linear_alphas_cumprod
from diffinject.diffusion.schedule import linear_betas as linear_betas
from diffinject.diffusion.schedule import p2_weights as p2_weights
from diffinject.diffusion.schedule import snr as snr
from diffinject.diffusion.unet_split import UNetEncoding as UNetEncoding
from diffinject.diffusion.unet_split import check_split_supported as check_split_supported
from diffinject.diffusion.unet_split import unet_decode as unet_decode
from diffinject.diffusion.unet_split import unet_encode as unet_encode
