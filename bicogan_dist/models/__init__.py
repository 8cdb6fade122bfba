"""Networks (G, E, D for gan / cgan / bigan / bicogan, two architectures) and GAN losses."""
from bicogan_dist.models.losses import (LossConfig, clip_weights_, d_loss, efl_loss, efl_weight, ge_loss,
                                        gradient_penalty)
from bicogan_dist.models.networks import (GANModels, ModelConfig, build_models, config_from_description,
                                          count_parameters, describe)

__all__ = [
    "GANModels", "LossConfig", "ModelConfig", "build_models", "clip_weights_", "config_from_description",
    "count_parameters", "d_loss", "describe", "efl_loss", "efl_weight", "ge_loss", "gradient_penalty",
]
