"""jaxdistill: make SDXL smaller and faster in JAX — prune the UNet, distil it from the full one.

Public API:
    spec, params = jaxdistill.load_unet(path)   # the file's dtype; dtype=jnp.float32 casts
    jaxdistill.save_unet(path, spec, params)
    out = jaxdistill.UNet(spec).apply({"params": params}, sample, timesteps, encoder_hidden_states,
                                      text_embeds, time_ids)   # out.sample (NHWC), out.features
    jaxdistill.presets.SDXL / SSD_1B / VEGA, jaxdistill.count_params(spec)
"""

from jaxdistill import presets
from jaxdistill.convert import WeightsError, load_unet, save_unet
from jaxdistill.spec import UNetSpec, UnsupportedConfigError
from jaxdistill.unet import UNet, UNetOutput, abstract_params, count_params, init_params

__all__ = [
    "UNet", "UNetOutput", "UNetSpec", "UnsupportedConfigError", "WeightsError", "abstract_params",
    "count_params", "init_params", "load_unet", "presets", "save_unet",
]
