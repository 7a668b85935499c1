"""Remote-code entry of the ShapeVAE component (written by CGMLLMPipeline.save_pretrained)."""

from .mesh_utils import *  # noqa: F401,F403
from .volume_decoding import *  # noqa: F401,F403
from .modeling_shape_vae import *  # noqa: F401,F403
from .modeling_shape_vae import ShapeVAE  # noqa: F401
