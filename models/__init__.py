"""N-stage VAE models, losses and the architecture schema. Plain nn.Modules; no distributed code."""
from .config import EncoderConfig, ModelConfig, StageConfig
from .losses import kl_divergence, nstage_loss, reconstruction_loss
from .presets import MODEL_PRESETS
from .vae import NStageVAE, resize_to


def __getattr__(name):
    # load_pretrained lives in models/pretrained.py, the package's only file I/O; import it lazily.
    if name == "load_pretrained":
        from .pretrained import load_pretrained
        return load_pretrained
    raise AttributeError(name)


__all__ = ["EncoderConfig", "ModelConfig", "StageConfig", "NStageVAE", "MODEL_PRESETS", "nstage_loss",
           "kl_divergence", "reconstruction_loss", "resize_to", "load_pretrained"]
