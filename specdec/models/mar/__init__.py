"""MAR (Li et al., "Autoregressive Image Generation without Vector Quantization", NeurIPS 2024, arXiv 2406.11838),
written for specdec and loading the official LTH14/mar checkpoints strict: the configs and released sizes
(`config`), the MAE-style backbone (`backbone`), the DiffLoss head and its respaced sampler (`diffloss`), the
KL-16 VAE (`vae`), checkpoint reading (`checkpoint`) and the official order / mask / CFG schedules (`sampling`).
The adapter that exposes one AR step to speculative decoding is `specdec.adapters.mar`."""
from specdec.models.mar.backbone import MAR, Attention, Block, Mlp
from specdec.models.mar.checkpoint import (load_mar, load_strict, load_vae, mar_from_file, read_checkpoint,
                                           vae_from_file)
from specdec.models.mar.config import DEFAULT_CFG, MAR_SIZES, MARConfig, VAEConfig
from specdec.models.mar.diffloss import (VARIANCES, DiffLoss, SimpleMLPAdaLN, cosine_betas, respaced_schedule,
                                         space_timesteps)
from specdec.models.mar.sampling import (CFG_SCHEDULES, ORDERS, MaskSchedule, cfg_schedule, make_order,
                                         mask_schedule, random_order, ranks, raster_order)
from specdec.models.mar.vae import KLVAE

__all__ = ["CFG_SCHEDULES", "DEFAULT_CFG", "KLVAE", "MAR", "MAR_SIZES", "ORDERS", "VARIANCES", "Attention", "Block",
           "DiffLoss", "MARConfig", "MaskSchedule", "Mlp", "SimpleMLPAdaLN", "VAEConfig", "cfg_schedule",
           "cosine_betas", "load_mar", "load_strict", "load_vae", "make_order", "mar_from_file", "mask_schedule",
           "random_order", "ranks", "raster_order", "read_checkpoint", "respaced_schedule", "space_timesteps",
           "vae_from_file"]
