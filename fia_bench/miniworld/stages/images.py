"""The stages trained on the render set's pixels: the VAE, then the classifier judge, which
also sees the VAE's reconstructions so that it reads generated images as it reads renders."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fia_bench.miniworld.build_files import as_unit, save_tensors
from fia_bench.miniworld.judges import MiniClassifier, save_classifier
from fia_bench.miniworld.nets import build_vae
from fia_bench.miniworld.renders import augment
from fia_bench.miniworld.state import BuildState


def train_vae(state: BuildState) -> bool:
    cfg = state.r["vae"]
    vae = build_vae(state.r).to(state.device)
    loop = state.loop("vae", {"vae": vae})
    pixels = as_unit(state.data["images"])

    def loss_fn(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(pixels), (cfg["batch_size"],), generator=g)
        x = pixels[idx].to(state.device)
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=g).to(state.device)
        z = posterior.mean + posterior.std * eps
        recon = vae.decode(z).sample
        return (
            F.mse_loss(recon, x)
            + 0.5 * F.l1_loss(recon, x)
            + cfg["kl_weight"] * posterior.kl().mean()
        )

    if not loop.run(state.seed, loss_fn, state.limits):
        return False
    vae.eval()
    save_tensors(state.build / "vae.safetensors", vae.state_dict())
    for derived in ("latents.safetensors", "recon.npz"):  # an earlier VAE's, if any
        (state.build / derived).unlink(missing_ok=True)
    state.encode_renders()
    return True


def train_classifier(state: BuildState) -> bool:
    cfg, a = state.r["classifier"], state.r["augment"]
    model = MiniClassifier(cfg["width"], state.classes).to(state.device)
    loop = state.loop("classifier", {"classifier": model})
    pixels = as_unit(state.data["images"])
    recon = state.reconstructions()
    labels = {k: torch.from_numpy(state.data[k]) for k in state.classes}
    boxes = torch.from_numpy(state.data["boxes"])

    def loss_fn(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(pixels), (cfg["batch_size"],), generator=g)
        out = model(augment(pixels, recon, idx, a, g).to(state.device))
        loss = sum(F.cross_entropy(out[k], labels[k][idx].to(state.device)) for k in labels)
        return loss + 5 * F.l1_loss(out["box"], boxes[idx].to(state.device))

    if not loop.run(state.seed, loss_fn, state.limits):
        return False
    model.eval().cpu()
    save_classifier(model, state.build / "export" / "judges", state.r["resolution"])
    return True
